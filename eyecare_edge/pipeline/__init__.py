"""The runtime pipeline: a bundle loaded for answering questions about eye images, without torch.

    from eyecare_edge.pipeline import Pipeline

    pipe = Pipeline.load("bundles/eyecare-3.8b")            # verifies the files it loads
    answer = pipe.ask("fundus.jpg", "Is there diabetic retinopathy?")
    print(answer.text, answer.timings)

One `ask` runs: decode the image(s) (`images`) -> anyres tiles (`preprocess`) -> tile embeddings
(`vision`: TensorRT / ONNX Runtime) -> visual token sequence (`layout`) -> the chat prompt rendered
with the bundle's template, split at the image placeholder, text pieces tokenized by the GGUF and
each image's visual sequence injected as embedding rows (`llm`, llama.cpp) -> greedy or sampled
generation, streamed through `stream` as it is produced.

The package, by job: `pipeline` (the `Pipeline` class: load, ask, report, describe; its
docstring covers prefix reuse, thread safety and verification), `options` (`PipelineOptions`,
`Answer`), `inputs` (image sources -> decoded frames with their digests), `plan` (which GGUF, the
visual token budget, n_ctx), `image_prefix` (the image prefix in the KV cache and in a
`PrefixCache`). Import the public names from here.
"""

from __future__ import annotations

from eyecare_edge.lazy import lazy_exports

# public name -> the module that defines it. Imported on first use, so that the options
# dataclass (`eyecare_edge.pipeline.options`) is readable without loading llama.cpp: the CLI's
# flag table reads its defaults from it on every `--help`.
_WHERE: dict[str, str] = {
    "Answer": "eyecare_edge.pipeline.options",
    "PipelineOptions": "eyecare_edge.pipeline.options",
    "ImageInput": "eyecare_edge.pipeline.inputs",
    "ImageSource": "eyecare_edge.pipeline.inputs",
    "decode_source": "eyecare_edge.pipeline.inputs",
    "Pipeline": "eyecare_edge.pipeline.pipeline",
    "choose_llm": "eyecare_edge.pipeline.plan",
    "default_n_ctx": "eyecare_edge.pipeline.plan",
    "max_visual_tokens": "eyecare_edge.pipeline.plan",
    "token_budget": "eyecare_edge.pipeline.plan",
    "LLMError": "eyecare_edge.llm",
    "VisionError": "eyecare_edge.vision",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())


__all__ = [
    "Answer",
    "ImageInput",
    "ImageSource",
    "LLMError",
    "Pipeline",
    "PipelineOptions",
    "VisionError",
    "choose_llm",
    "decode_source",
    "default_n_ctx",
    "max_visual_tokens",
    "token_budget",
]
