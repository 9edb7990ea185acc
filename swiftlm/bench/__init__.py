"""Benchmark suite: `swiftlm bench {serve,latency,throughput,reliability,compare}`.

Online figures follow vLLM's `bench serve` definitions so that runs against swiftlm and against other
OpenAI-compatible engines can be compared number for number; see `swiftlm.bench.metrics`.
"""
