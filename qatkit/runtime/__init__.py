"""What *is* a runtime: llama.cpp (loading, scoring and quantizing GGUF files through
llama-cpp-python), ExecuTorch (running .pte programs), the ctypes binding to ggml's own C code,
and the faithful mode that rounds a torch forward where llama.cpp's CPU backend rounds.
Measurement built on them lives in `qatkit/eval/`."""
