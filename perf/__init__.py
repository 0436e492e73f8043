"""`eyecare-edge perf` (the perf room, a top-level folder mapped to `eyecare_edge.perf`): speed
and memory of the runtime against PyTorch and against the machine.

One module per job:

- `machine`: what this computer can do at best (memory bandwidth, matrix-multiply FLOP/s) and
  what else is running on it (load average), probed with numpy, no torch.
- `eyecare_edge.costs` (runtime, `inspect` uses it too): the model's shapes turned into work
  (FLOPs per tile or token, weight bytes per decoded token), the bounds that follow from the
  machine's limits, and the extrapolation from a cut depth to the full model.
- `eyecare_edge.training.reference`: the PyTorch/transformers measurements (FP32 and BF16). torch
  is imported inside its functions only, and those functions run in child processes.
- `runtime`: our backends (ONNX Runtime, OpenVINO, TensorRT, llama.cpp) and the end-to-end
  `Pipeline`.
- `rss`: run one measurement in a child process and read its peak resident memory, so systems
  do not pollute each other's figures.
- `build`: the cached random-weight checkpoint and bundle of a preset's exact widths.
- `options` (what a run measures, its raw state), `inputs` (GPU, image, budgets, GGUF bytes),
  `runner` (children), `stages` and `token_runs` (the measurements), `run` (the orchestration).
- `tokens`: the visual-token budget x reduction method table; `positions`: position fidelity.
- `rows` (perf.json's rows as dataclasses), `depth` (scaling to full depth), `sections` (raw
  results -> rows), `ratios` (ratios and targets), `report` (perf.json), `table` (the text).
"""
