"""Training room (`eyecare_edge.training`): EyecareGPT model, presets, training stages.

May import torch, transformers, peft, accelerate and `eyecare_edge.preprocess` / `eyecare_edge.layout`.
"""
