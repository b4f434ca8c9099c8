# Work around Debian's libxsimd-dev 8.1.0: the exported `xsimd` target carries
# INTERFACE_LINK_LIBRARIES "xtl" (built with ENABLE_XTL_COMPLEX=ON), but xsimdConfig.cmake
# never calls find_dependency(xtl), so linking `xsimd` fails with "cannot find -lxtl"
# (xtensor-stack/xsimd#869, fixed upstream in 9.0/11.0). The headers never enable xtl, so an
# empty stand-in target is safe. Included by the project and by the installed package config.
if(TARGET xsimd AND NOT TARGET xtl)
  find_package(xtl QUIET)  # bookworm has xtl-dev 0.7.2; not required
  if(NOT TARGET xtl)
    add_library(xtl INTERFACE IMPORTED GLOBAL)
  endif()
endif()
