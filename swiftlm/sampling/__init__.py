"""Token sampling on the device: penalties, min_tokens, greedy, temperature, top-k/top-p/min-p, per-request seeded
draws and logprobs, built to need no host sync within a step."""
from swiftlm.sampling.batch import GREEDY_TEMPERATURE, SamplingBatch, SamplingRow
from swiftlm.sampling.sampler import Sampler, SamplerOutput

__all__ = ["GREEDY_TEMPERATURE", "Sampler", "SamplerOutput", "SamplingBatch", "SamplingRow"]
