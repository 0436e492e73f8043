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

from eyecare_edge.llm import LLMError
from eyecare_edge.pipeline.inputs import ImageInput, ImageSource, decode_source
from eyecare_edge.pipeline.options import Answer, PipelineOptions
from eyecare_edge.pipeline.pipeline import Pipeline
from eyecare_edge.pipeline.plan import choose_llm, default_n_ctx, max_visual_tokens, token_budget
from eyecare_edge.vision import VisionError

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
