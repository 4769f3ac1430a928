"""Inference speed, in one place. Nothing here changes what a model computes (each piece is tested
against the plain path it replaces); each piece stays because a measurement on the 2-core CPU
machine says it is faster, and the measurement is named with it.

- `decode`: greedy decoding and sampling without GenerationMixin's per-step overhead (preallocated
  KV cache, cross-attention keys/values once per image, last-position logits, weights laid out once).
  `MMGPTModel.generate` takes it when no option asks for more. Small model, batch 1: 2.2-2.4x VED's
  tokens/s, batch 16: 1.4-1.7x (`make bench`, rows generate_small_*; GenerationMixin on the same
  model is the "mmgpt eager" baseline inside `benchmarks/decode_kernels.py`).
- `kernels`: an AVX2 C kernel for products of 1-16 rows (fp32 and int8 weights), built on first use
  with the system's C compiler; torch's one-row products read weights at 5-9 GB/s here, the kernel
  at ~12 GB/s on one thread (`python -m benchmarks.decode_kernels`).
- `quantize`: weight-only int8 (`load(..., quantize="int8")`): a quarter of the bytes per token
  through `kernels.rows_linear_int8`; torch's `_weight_int8pack_mm` needs bf16 activations to be fast
  and lost to it (`python -m benchmarks.int8_decode`, which times both).
- `vit`: a fused inference forward for the ViT encoder (q/k/v in one oneDNN matmul, bias, GELU and
  residual in the matmul's epilogue): 1.25x Hugging Face's ViTModel forward at batch 1 and 1.34x
  at batch 16 on the small size (38.0 vs 47.7 ms, 524 vs 702 ms; medians of 9 interleaved rounds,
  2 threads, idle machine, 2026-12-02), same features to float32 rounding.
- `threads`: on a CPU whose other cores are busy, the encoder and the decoding loop run on one
  thread (a 2-thread step then took up to 30x longer than a 1-thread one here).
"""
