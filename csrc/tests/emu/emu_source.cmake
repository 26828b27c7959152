# emu_source.cmake - turns a CUDA source into the C++ that the host
# emulation compiles (cmake -DIN=x.cu -DOUT=x.cpp -P emu_source.cmake):
#   kernel<<<grid, block, smem, stream>>>(args)  ->  ::emu::launch(kernel, grid, block, smem, stream)(args)
#   extern __shared__ T name[];                  ->  T *name = static_cast<T *>(::emu::dyn_smem());
# Everything else compiles as it is against the emulated headers (emu.h).
file(READ "${IN}" src)
string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_]*(<[A-Za-z0-9_, ]*>)?)<<<([^;]*)>>>\\("
       "::emu::launch(\\1, \\3)(" src "${src}")
string(REGEX REPLACE "extern __shared__ (__align__\\([0-9]+\\) )?([A-Za-z_][A-Za-z0-9_]*) ([A-Za-z_][A-Za-z0-9_]*)\\[\\];"
       "\\2 *\\3 = static_cast<\\2 *>(::emu::dyn_smem());" src "${src}")
if(src MATCHES "<<<")
  message(FATAL_ERROR "${IN}: a kernel launch the emulation cannot rewrite")
endif()
file(WRITE "${OUT}.tmp" "#line 1 \"${IN}\"\n${src}")
file(COPY_FILE "${OUT}.tmp" "${OUT}" ONLY_IF_DIFFERENT)
file(REMOVE "${OUT}.tmp")
