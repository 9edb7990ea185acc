"""swiftlm: a fast inference and serving engine for the Qwen model family."""
from swiftlm.config import EngineConfig
from swiftlm.outputs import RequestOutput
from swiftlm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":  # imported lazily so `import swiftlm` stays light (no torch model code)
        from swiftlm.engine.llm import LLM
        return LLM
    raise AttributeError(name)
