"""Model runner: owns the model, the KV cache and the step inputs; runs one forward and samples.

Step inputs are packed into one pinned int32 host buffer with fixed segment offsets and moved with a single
host-to-device copy into a device buffer of the same layout. Decode-only steps replay a CUDA graph captured
for the next larger batch size; those graphs read the same device buffer, so a replay needs no extra copies.

Nothing in `execute` waits for the device: the host may pack step n+1 while step n runs (asynchronous
scheduling). Two pinned buffers alternate so a pack never overwrites one that an earlier upload still reads;
input ids that step n sampled come from its device tensor (`fill_sampled_ids`), and the samples travel back
to pinned host memory behind an event (`StepSamples`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from swiftlm.config import EngineConfig
from swiftlm.engine.kv_cache import BlockAllocator, cdiv
from swiftlm.engine.scheduler import ScheduledSeq, SchedulerOutput
from swiftlm.kernels.sampled_ids import fill_sampled_ids
from swiftlm.layers.attention import AttentionMetadata, forward_context, warm_fresh_attention
from swiftlm.loader.checkpoint import has_weights, init_dummy_weights, iterate_weights
from swiftlm.models import get_model_class
from swiftlm.models.qwen3 import no_quant
from swiftlm.sampling import Sampler, SamplerOutput, SamplingBatch, SamplingRow

logger = logging.getLogger(__name__)

GRAPH_RESERVE_BYTES = 512 << 20
CPU_KV_CACHE_BYTES = 1 << 30


PREFILL_GRAPH_TOKENS = (32, 64, 128, 256, 512, 1024, 2048)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... up to max_num_seqs (always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def _leading_decodes(batch: SchedulerOutput) -> int:
    """How many leading scheduled sequences take one new token; the scheduler puts running decodes first."""
    count = 0
    for item in batch.scheduled:
        if item.num_new_tokens != 1:
            break
        count += 1
    return count


def _fresh_tail(prompts: list[ScheduledSeq]) -> list[int] | None:
    """New-token counts of the trailing prompts that start at position 0 (waiting requests come last)."""
    start = len(prompts)
    while start and prompts[start - 1].seq.num_computed_tokens == 0:
        start -= 1
    return [item.num_new_tokens for item in prompts[start:]] or None


@dataclass
class _Segments:
    """Offsets of each field inside the packed int32 step buffer."""

    max_tokens: int
    max_seqs: int
    width: int

    def __post_init__(self) -> None:
        t, s = self.max_tokens, self.max_seqs
        self.ids, self.pos, self.slots = 0, t, 2 * t
        self.seq_lens = 3 * t
        self.cu_q = self.seq_lens + s
        self.logits_idx = self.cu_q + s + 1
        self.num_real_tokens = self.logits_idx + s
        self.fill_pos = self.num_real_tokens + 1
        self.fill_row = self.fill_pos + s
        self.block_tables = self.fill_row + s
        self.total = self.block_tables + s * self.width

    def end(self, rows: int) -> int:
        return self.block_tables + rows * self.width


@dataclass
class StepSamples:
    """One step's samples: on the device (the next step's input ids may read them before the host has) and a
    copy on its way to pinned host memory. `result()` waits for that copy only, not for steps launched after."""

    device: SamplerOutput
    host: SamplerOutput
    ready: torch.cuda.Event | None = None

    @classmethod
    def copy_to_host(cls, out: SamplerOutput) -> "StepSamples":
        if not out.token_ids.is_cuda:
            return cls(out, out)

        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

        host = SamplerOutput(copy(out.token_ids), copy(out.logprobs), copy(out.top_ids), copy(out.top_logprobs))
        ready = torch.cuda.Event()
        ready.record()
        return cls(out, host, ready)

    def result(self) -> SamplerOutput:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config: dict, model_path: str, max_model_len: int) -> None:
        self.config = config
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        torch.manual_seed(config.seed)
        start = time.perf_counter()
        self.model = self._load_model(hf_config, model_path, max_model_len)
        if config.expert_stats:  # before graph capture, so the graphs count too
            if not hasattr(self.model, "enable_expert_stats"):
                raise ValueError("expert_stats needs a mixture-of-experts model")
            self.model.enable_expert_stats()
        self.hf_config = hf_config
        self.vocab_size = self.model.config.vocab_size
        self.attn_layers = self.model.attention_layers()
        self.max_num_seqs = config.max_num_seqs
        self.max_num_tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
        self.max_model_len = max_model_len
        self.seg = _Segments(self.max_num_tokens, self.max_num_seqs, cdiv(max_model_len, self.block_size))
        pin = self.device.type == "cuda"
        self.host_bufs = [torch.zeros(self.seg.total, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self.uploaded: list[torch.cuda.Event | None] = [None, None]
        self.host_index = 0
        self.host_buf = self.host_bufs[0]
        self.host_np = self.host_buf.numpy()
        self.dev_buf = torch.zeros(self.seg.total, dtype=torch.int32, device=self.device)
        self.logits_buf = torch.empty(self.max_num_seqs, self.vocab_size, dtype=torch.float32, device=self.device)
        self.sampler = Sampler()
        self.num_blocks = self._num_kv_blocks()
        self._allocate_kv_cache(self.num_blocks)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.device.type == "cuda":
            self._warm_fresh_attention()
            self._fill_pending(0, torch.zeros(1, dtype=torch.int64, device=self.device))  # compile it now
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_graphs()
        if config.expert_stats:
            self.model.reset_expert_stats()  # the KV-sizing profile run routed dummy tokens
        logger.info("model runner ready in %.1fs: %d KV blocks of %d tokens, %d CUDA graphs",
                    time.perf_counter() - start, self.num_blocks, self.block_size, len(self.graphs))

    # ---- setup -------------------------------------------------------------------------------------------
    def _load_model(self, hf_config: dict, model_path: str, max_model_len: int) -> torch.nn.Module:
        cls = get_model_class(hf_config)
        quant_for = no_quant
        if self.config.quantization or hf_config.get("quantization_config"):
            from swiftlm.layers.quantization import get_linear_method
            quant_for = get_linear_method(self.config.quantization, hf_config.get("quantization_config"))
        with torch.device(self.device):
            model = cls(hf_config, self.dtype, quant_for, max_model_len)
        fmt = self.config.load_format
        dummy = fmt == "dummy" or (fmt == "auto" and not has_weights(model_path))
        if dummy:
            if self.config.load_format == "auto":
                logger.warning("no safetensors in %s: using random weights (load_format=dummy)", model_path)
            init_dummy_weights(model, self.config.seed)
        else:
            loaded = model.load_weights(iterate_weights(model_path, self.device))
            missing = {n for n, _ in model.named_parameters()} - loaded
            if missing:
                raise ValueError(f"checkpoint {model_path!r} lacks weights for {sorted(missing)[:8]}...")
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
        return model.eval()

    def kv_block_bytes(self) -> int:
        layer = self.attn_layers[0]
        itemsize = torch.empty((), dtype=self._kv_dtype()).element_size()
        return 2 * len(self.attn_layers) * self.block_size * layer.num_kv_heads * layer.head_dim * itemsize

    def _kv_dtype(self) -> torch.dtype:
        if self.config.kv_cache_dtype in ("auto", None):
            return self.dtype
        if self.config.kv_cache_dtype in ("fp8", "fp8_e4m3"):
            return torch.float8_e4m3fn  # per-tensor scales live on each Attention layer; kernels dequantize
        raise ValueError(f"unknown kv_cache_dtype {self.config.kv_cache_dtype!r}")

    @torch.inference_mode()
    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type != "cuda":
            return max(2, CPU_KV_CACHE_BYTES // self.kv_block_bytes())
        self._profile_run()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.gpu_memory_utilization - used_by_others - torch.cuda.max_memory_allocated(
            self.device) - GRAPH_RESERVE_BYTES
        blocks = int(budget // self.kv_block_bytes())
        if blocks < 2:
            raise ValueError(
                f"no GPU memory left for the KV cache: {self.config.gpu_memory_utilization:.2f} x "
                f"{total / 2**30:.1f} GiB, minus {used_by_others / 2**30:.2f} GiB used outside this engine's "
                f"allocator and {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB peak for weights and "
                f"activations, leaves {budget / 2**30:.2f} GiB; raise --gpu-memory-utilization or lower "
                "--max-num-batched-tokens")
        return blocks

    def _profile_run(self) -> None:
        """Forwards at the largest step size, against a one-block (zeroed) cache, to measure peak activation
        memory: one fresh prompt (SDPA), then a prompt continuing a cached prefix beside one decode row and beside
        as many as a step holds (the decode and paged prefill kernels of mixed steps: one row splits its context,
        many take the decode kernel's unsplit variant). These also compile those kernels now rather than in the
        first request that needs them (a Triton compile took 1.8 s on the H100 host)."""
        self._allocate_kv_cache(1)
        torch.cuda.reset_peak_memory_stats(self.device)
        n = self.max_num_tokens
        ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        fresh = AttentionMetadata(
            slot_mapping=torch.zeros(n, dtype=torch.int64, device=self.device),
            block_tables=torch.zeros(1, cdiv(n, self.block_size), dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=self.device), max_seqlen_q=n,
            fresh_prefill_lens=[n])
        mixed = AttentionMetadata(
            slot_mapping=fresh.slot_mapping,
            block_tables=torch.zeros(2, cdiv(n, self.block_size), dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([n, n], dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor([0, n - 1], dtype=torch.int32, device=self.device), max_seqlen_q=n - 1,
            num_decodes=1)
        many = min(self.max_num_seqs - 1, n - 1)
        wide = AttentionMetadata(
            slot_mapping=fresh.slot_mapping,
            block_tables=torch.zeros(many + 1, cdiv(n, self.block_size), dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([1] * many + [n], dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor([0, n - many], dtype=torch.int32, device=self.device),
            max_seqlen_q=n - many, num_decodes=many)
        for meta in [fresh] + [mixed] * (n > 1) + [wide] * (many > 1):
            with forward_context(meta):
                hidden = self.model(ids, ids)
            self.model.compute_logits(hidden[: self.max_num_seqs])
        torch.cuda.synchronize(self.device)
        self._allocate_kv_cache(0)
        torch.cuda.empty_cache()

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        for layer in self.attn_layers:
            layer.k_cache = layer.v_cache = None
        if num_blocks == 0:
            return
        layer0 = self.attn_layers[0]
        shape = (len(self.attn_layers), 2, num_blocks, self.block_size, layer0.num_kv_heads, layer0.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self._kv_dtype(), device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]

    # ---- per step ----------------------------------------------------------------------------------------
    def _views(self, rows: int, tokens: int) -> tuple[torch.Tensor, ...]:
        s, d = self.seg, self.dev_buf
        return (d[s.ids: s.ids + tokens], d[s.pos: s.pos + tokens], d[s.slots: s.slots + tokens],
                d[s.seq_lens: s.seq_lens + rows], d[s.cu_q: s.cu_q + rows + 1],
                d[s.logits_idx: s.logits_idx + rows], d[s.block_tables: s.end(rows)].view(rows, s.width))

    def _real_tokens_view(self) -> torch.Tensor:
        """[1] on the device: how many leading tokens of the step belong to a sequence (the rest pad a graph)."""
        return self.dev_buf[self.seg.num_real_tokens: self.seg.num_real_tokens + 1]

    def _pack(self, batch: SchedulerOutput, rows: int, pad_tokens_to: int | None = None,
              num_decodes: int = 0) -> tuple[int, int, list[int], int]:
        """Fill the host buffer; returns (tokens, max query length, indices of sampling rows, pending ids).

        `pad_tokens_to` pads the flat token list (prefill graphs): padding tokens belong to no sequence and
        write their K/V into the reserved block. The query offsets start after the first `num_decodes` rows
        (see `AttentionMetadata.num_decodes`). A decode on a pending token (sampled by the step in flight; the
        scheduler never puts one inside a prompt chunk) gets id 0 here and a (token, sample row) pair in the
        fill segments, which `execute` resolves on the device.
        """
        s, h, bs = self.seg, self.host_np, self.block_size
        t = 0
        max_q = 1
        fills = 0
        sample_rows: list[int] = []
        bt = h[s.block_tables: s.end(rows)].reshape(rows, s.width)
        h[s.cu_q] = 0
        for i, item in enumerate(batch.scheduled):
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            table = seq.block_table
            bt[i, : len(table)] = table
            if n == 1:
                if start < len(seq.token_ids):
                    h[s.ids + t] = seq.token_ids[start]
                else:
                    h[s.ids + t] = 0
                    h[s.fill_pos + fills] = t
                    h[s.fill_row + fills] = seq.pending_row
                    fills += 1
                h[s.pos + t] = start
                h[s.slots + t] = table[start // bs] * bs + start % bs
            else:
                pos = np.arange(start, start + n)
                h[s.ids + t: s.ids + t + n] = seq.token_ids[start: start + n]
                h[s.pos + t: s.pos + t + n] = pos
                h[s.slots + t: s.slots + t + n] = np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs
                max_q = max(max_q, n)
            t += n
            h[s.seq_lens + i] = start + n
            if i >= num_decodes:
                h[s.cu_q + i - num_decodes + 1] = t - num_decodes
            if item.samples:
                h[s.logits_idx + len(sample_rows)] = t - 1
                sample_rows.append(i)
        h[s.num_real_tokens] = t
        for i in range(len(batch.scheduled), rows):  # CUDA-graph padding rows write to the reserved block 0
            h[s.ids + t] = 0
            h[s.pos + t] = 0
            h[s.slots + t] = BlockAllocator.NULL_BLOCK
            h[s.seq_lens + i] = 1
            bt[i, 0] = BlockAllocator.NULL_BLOCK
            t += 1
        if pad_tokens_to is not None:
            h[s.ids + t: s.ids + pad_tokens_to] = 0
            h[s.pos + t: s.pos + pad_tokens_to] = 0
            h[s.slots + t: s.slots + pad_tokens_to] = BlockAllocator.NULL_BLOCK
        return t, max_q, sample_rows, fills

    def _next_host_buffer(self) -> None:
        """Switch to the other pinned buffer once the upload that last read it has finished (in practice long
        since: the host runs at most one step ahead of the device)."""
        self.host_index ^= 1
        done = self.uploaded[self.host_index]
        if done is not None:
            done.synchronize()
        self.host_buf = self.host_bufs[self.host_index]
        self.host_np = self.host_buf.numpy()

    def _upload(self, rows: int) -> None:
        end = self.seg.end(rows)
        self.dev_buf[:end].copy_(self.host_buf[:end], non_blocking=True)
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
            self.uploaded[self.host_index] = done

    def _fill_pending(self, fills: int, sampled: torch.Tensor) -> None:
        """Write the first `fills` packed (token, sample row) pairs' sampled ids into the device input ids."""
        s, d = self.seg, self.dev_buf
        fill_sampled_ids(d[s.ids: s.ids + self.max_num_tokens], d[s.fill_pos: s.fill_pos + fills],
                         d[s.fill_row: s.fill_row + fills], sampled, self.max_num_seqs)

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput, pending: torch.Tensor | None = None
                ) -> tuple[list[int], StepSamples | None]:
        """Launch one forward and its sampling without waiting for either; returns (indices of scheduled seqs
        that sampled, their samples). `pending`: the token ids sampled by the step still in flight, which the
        sequences' pending tokens (`Sequence.pending_row`) are read from."""
        num_rows = len(batch.scheduled)
        graph_bs = self._graph_size(num_rows) if batch.decode_only else None
        prefill_graph = None if batch.decode_only else self._prefill_graph_size(batch)
        rows = graph_bs or num_rows
        eager_prefill = graph_bs is None and prefill_graph is None and not batch.decode_only
        num_decodes = _leading_decodes(batch) if eager_prefill else 0
        self._next_host_buffer()
        tokens, max_q, sample_rows, fills = self._pack(batch, rows, pad_tokens_to=prefill_graph,
                                                       num_decodes=num_decodes)
        fresh = _fresh_tail(batch.scheduled[num_decodes:]) if eager_prefill else None
        self._upload(rows)
        if fills:
            if pending is None:
                raise RuntimeError("the batch has pending tokens but no samples to read them from")
            self._fill_pending(fills, pending)
        if graph_bs is not None:
            self.graphs[graph_bs].replay()
            logits = self.logits_buf[:num_rows]
        elif prefill_graph is not None:
            self.prefill_graphs[prefill_graph].replay()
            logits = self.logits_buf[:1]
        else:
            ids, pos, slots, seq_lens, cu_q, logits_idx, bt = self._views(rows, tokens)
            prompts = rows - num_decodes
            meta = AttentionMetadata(slots.long(), bt, seq_lens, None if batch.decode_only else cu_q[: prompts + 1],
                                     max_q, num_decodes=num_decodes, fresh_prefill_lens=fresh)
            with forward_context(meta):
                hidden = self.model(ids, pos)
            logits = self.model.compute_logits(hidden[logits_idx[: len(sample_rows)]])
        if not sample_rows:
            return [], None
        seqs = [batch.scheduled[i].seq for i in sample_rows]
        rows_meta = [SamplingRow(params=q.params, seed=q.seed, step=q.num_output_tokens,
                                 prompt_token_ids=q.prompt_token_ids, output_token_ids=q.output_token_ids,
                                 eos_token_ids=q.eos_token_ids) for q in seqs]
        sampling = SamplingBatch.build(rows_meta, self.vocab_size, self.device)
        return sample_rows, StepSamples.copy_to_host(self.sampler(logits, sampling))

    @torch.inference_mode()
    def _warm_fresh_attention(self) -> None:
        start = time.perf_counter()
        layer = self.attn_layers[0]
        count = warm_fresh_attention(layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.scale, self.dtype,
                                     self.device, self.max_num_tokens)
        torch.cuda.synchronize(self.device)
        logger.info("built cuDNN attention plans for %d prompt lengths in %.1fs", count, time.perf_counter() - start)

    # ---- CUDA graphs ---------------------------------------------------------------------------------------
    def _graph_size(self, n: int) -> int | None:
        for size in sorted(self.graphs):
            if size >= n:
                return size
        return None

    def _prefill_graph_size(self, batch: SchedulerOutput) -> int | None:
        """Smallest prefill graph that fits a one-sequence step (interactive TTFT), if any."""
        if len(batch.scheduled) != 1 or not batch.scheduled[0].samples:
            return None
        n = batch.scheduled[0].num_new_tokens
        return next((size for size in sorted(self.prefill_graphs) if size >= n), None)

    def _prefill_forward(self, tokens: int) -> None:
        """One sequence's (chunk of) prompt, padded to `tokens`, through the varlen paged-prefill kernel."""
        ids, pos, slots, seq_lens, cu_q, logits_idx, bt = self._views(1, tokens)
        meta = AttentionMetadata(slots.long(), bt, seq_lens, cu_q, tokens, padded_tokens=True,
                                 num_real_tokens=self._real_tokens_view())
        with forward_context(meta):
            hidden = self.model(ids, pos)
        self.model.compute_logits(hidden[logits_idx], out=self.logits_buf[:1])

    def _decode_forward(self, bs: int) -> None:
        ids, pos, slots, seq_lens, _, _, bt = self._views(bs, bs)
        meta = AttentionMetadata(slots.long(), bt, seq_lens, num_real_tokens=self._real_tokens_view())
        with forward_context(meta):
            hidden = self.model(ids, pos)
        self.model.compute_logits(hidden, out=self.logits_buf[:bs])

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        start = time.perf_counter()
        # Padding-style inputs: every row attends to one token of the reserved block.
        s = self.seg
        self.host_np[:] = 0
        self.host_np[s.seq_lens: s.seq_lens + self.max_num_seqs] = 1
        self._upload(self.max_num_seqs)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in sorted(graph_batch_sizes(self.max_num_seqs), reverse=True):
                self._decode_forward(bs)  # warm-up: JIT compiles and autotunes outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._decode_forward(bs)
                self.graphs[bs] = graph
            # Prefill graphs are captured on a one-token prompt: cu_seqlens [0, 1], one sampled row.
            self.host_np[s.cu_q + 1] = 1
            self._upload(1)
            for tokens in sorted((t for t in PREFILL_GRAPH_TOKENS if t <= self.max_num_tokens), reverse=True):
                self._prefill_forward(tokens)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._prefill_forward(tokens)
                self.prefill_graphs[tokens] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode and %d prefill CUDA graphs in %.1fs", len(self.graphs),
                    len(self.prefill_graphs), time.perf_counter() - start)
