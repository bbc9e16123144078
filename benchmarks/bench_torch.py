"""The bench's PyTorch / transformers side, in a process of its own.

Each framework gets its own process and so its own host heap: in one process torch's allocations
fragment the heap XLA:CPU takes its per-step temp buffer from (one ~4 GB block at the full bench
size), the next step's block no longer fits in the hole it left, the heap grows, and on the virtual
machines we run on fresh pages cost 0.5-3.5 s per GB: ours 4.4-5.7 s per step without page faults,
10.1 s in a step that took 686 k of them, after torch's step had run in the same heap
(BENCHMARKS.md). The worker applies the same allocator settings as our side (host_memory), which makes
torch's step faster too.

`TorchSide` starts the worker (spawned: no JAX state is inherited), sends it one command at a time and
gets back the seconds and page faults the worker measured around the call, so the parent can
interleave ours, theirs, ours, theirs as before.
"""

from __future__ import annotations

import multiprocessing
import resource
import time


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measured(function):
    """A callable returning (seconds, minor page faults) of one call of `function` in this process."""
    def run():
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = timed(function)
        return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return run


def torch_grpo_loss(model, prompts, responses, advantages):
    """The same token-mean GRPO loss in torch, sequences right-padded to one batch.

    ratio = exp(logp - logp.detach()) (on-policy: value 1, gradient of logp); loss = -mean(A * ratio)."""
    import torch

    ids, mask, response_mask, adv = padded_batch(prompts, responses, advantages)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # [B, T-1, V]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    ratio = torch.exp(logp - logp.detach())
    return -(adv[:, None] * ratio * response_mask).sum() / response_mask.sum()


def padded_batch(prompts, responses, advantages):
    import numpy as np
    import torch

    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = np.zeros((len(prompts), longest), np.int64)
    mask = np.zeros_like(ids)
    response_mask = np.zeros((len(prompts), longest - 1), np.float32)  # aligned with the shifted targets
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = np.concatenate([p, r])
        mask[i, :n] = 1
        response_mask[i, len(p) - 1:n - 1] = 1
    return (torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(response_mask),
            torch.tensor(np.asarray(advantages, np.float32)))


class _Reference:
    """The torch workloads, on `transformers.Qwen3ForCausalLM` loaded from `work_dir` (the weights ours
    loads too). Eager attention, as tiny.make_tiny_qwen3 builds it: on this padded batch SDPA's masked
    path was not faster (train step 8.0-10.4 s eager vs 9.2-12.3 s SDPA; BENCHMARKS.md)."""

    def __init__(self, work_dir: str, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.Qwen3ForCausalLM.from_pretrained(
            work_dir, torch_dtype=torch.float32, attn_implementation="eager")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6, weight_decay=0.01)
        self.train_data = None
        self.sample_args = None

    def set_train_data(self, prompts, responses, advantages):
        self.train_data = (prompts, responses, advantages)
        self.ids, self.mask, _, _ = padded_batch(prompts, responses, advantages)

    def set_sample_args(self, prompt_ids, new_tokens: int):
        self.sample_args = (self.torch.tensor(prompt_ids), new_tokens)

    def train(self):
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        torch_grpo_loss(self.model, *self.train_data).backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()

    def release(self):  # between the bench's phases: drop the gradients, give freed memory back
        import gc

        from mathgrpo.utils import host_memory

        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        host_memory.release_freed_host_memory()

    def logprob(self):  # the same outputs as ours: log-prob of each token and verl's entropy_from_logits
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            logits = self.model(input_ids=self.ids, attention_mask=self.mask).logits[:, :-1]
            logp = torch.log_softmax(logits, -1)
            logp.gather(-1, self.ids[:, 1:, None])
            torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)

    def sample(self):
        torch = self.torch
        ids, new_tokens = self.sample_args
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                      top_p=1.0, top_k=0, use_cache=True, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=0)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")


def _serve(connection, work_dir: str, threads: int) -> None:
    """Worker loop: (method, args) in; ("ok", seconds, page faults) or ("error", message) out."""
    from mathgrpo.utils import host_memory

    host_memory.keep_freed_host_memory()  # before torch starts its threads, as our side does
    try:
        reference = _Reference(work_dir, threads)
        connection.send(("ok", 0.0, 0))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
        connection.send(("error", f"{type(error).__name__}: {error}"))
        return
    while True:
        method, args = connection.recv()
        if method == "stop":
            return
        try:
            seconds, faults = measured(lambda: getattr(reference, method)(*args))()
            connection.send(("ok", seconds, faults))
        except Exception as error:  # noqa: BLE001
            connection.send(("error", f"{method}: {type(error).__name__}: {error}"))


class TorchSide:
    """The reference in a spawned process; `call(method, *args)` returns (seconds, page faults) of that
    call as measured inside the worker. Use as a context manager."""

    def __init__(self, work_dir: str, threads: int):
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, work_dir, threads), daemon=True)
        self._process.start()
        child.close()
        self._receive("start")

    def _receive(self, method: str):
        if not self._connection.poll(600):
            raise RuntimeError(f"torch worker gave no answer to {method!r} within 600 s")
        try:
            reply = self._connection.recv()
        except EOFError:
            raise RuntimeError(f"torch worker died during {method!r} (exit code {self._process.exitcode})") from None
        if reply[0] != "ok":
            raise RuntimeError(f"torch worker failed: {reply[1]}")
        return reply[1], reply[2]

    def call(self, method: str, *args) -> tuple[float, int]:
        self._connection.send((method, args))
        return self._receive(method)

    def close(self) -> None:
        if self._process.is_alive():
            self._connection.send(("stop", ()))
            self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
        self._connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
