# cmake -P script behind the `consumer/install` ctest fixture: install the current build tree
# into a fresh prefix, then check that the package files are where consumers look for them.
#   -DBUILD_DIR=<headwise build dir>  -DPREFIX=<install prefix (wiped first)>  -DCONFIG=<config>
#   -DINCLUDEDIR=<CMAKE_INSTALL_INCLUDEDIR>  -DDATADIR=<CMAKE_INSTALL_DATADIR>
cmake_minimum_required(VERSION 3.25)

file(REMOVE_RECURSE "${PREFIX}")
execute_process(
  COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" --config "${CONFIG}"
  COMMAND_ECHO STDOUT
  COMMAND_ERROR_IS_FATAL ANY)

foreach(f ${INCLUDEDIR}/headwise/headwise.hpp
          ${DATADIR}/cmake/headwise/headwiseConfig.cmake
          ${DATADIR}/cmake/headwise/headwiseConfigVersion.cmake
          ${DATADIR}/cmake/headwise/headwiseTargets.cmake
          ${DATADIR}/cmake/headwise/xsimd_debian_shim.cmake
          ${DATADIR}/pkgconfig/headwise.pc)
  if(NOT EXISTS "${PREFIX}/${f}")
    message(FATAL_ERROR "install is missing ${PREFIX}/${f}")
  endif()
endforeach()
