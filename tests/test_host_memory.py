"""The host allocator settings: XLA:CPU's per-step buffers are reused, not faulted in afresh."""

import subprocess
import sys
import textwrap

from mathgrpo.utils import host_memory

SCRIPT = textwrap.dedent("""
    import os, resource, sys
    from mathgrpo.utils import host_memory
    applied = host_memory.keep_freed_host_memory() if sys.argv[1] == "apply" else False
    import jax, jax.numpy as jnp
    x = jnp.ones((2**24,))  # 64 MiB
    step = jax.jit(lambda x: jnp.sum(jnp.exp(x) * 2.0 + jnp.cumsum(x)))  # 64 MiB temporaries
    step(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step(x).block_until_ready()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults_of_ten_steps(mode: str) -> tuple[bool, int]:
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env,
                          timeout=300, check=True)
    applied, faults = done.stdout.split()
    return applied == "True", int(faults)


def test_steps_after_warmup_reuse_host_memory():
    applied, faults = faults_of_ten_steps("apply")
    assert applied
    # Without the settings each step maps its 64 MiB temporaries afresh: 10 × 16,384 pages at least.
    _, default_faults = faults_of_ten_steps("default")
    assert default_faults > 10 * 16384, default_faults
    # With them most steps fault nothing; the heap's layout settles over the first few (it depends on
    # the order the worker threads allocate in), measured 0-76 k faults in 10 steps vs 350-380 k.
    assert faults < default_faults / 2, (faults, default_faults)


def test_not_applied_for_accelerators_or_when_opted_out(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not host_memory.runs_on_cpu()
    assert not host_memory.keep_freed_host_memory()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.runs_on_cpu()
    monkeypatch.setenv("MATHGRPO_HOST_MALLOC", "default")
    assert not host_memory.keep_freed_host_memory()


def test_an_installed_jax_plugin_counts_as_an_accelerator(monkeypatch, tmp_path):
    """Plugins are found as JAX finds them: a module in the `jax_plugins` namespace package."""
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delitem(__import__("sys").modules, "jax_plugins", raising=False)
    assert host_memory.runs_on_cpu()  # this machine has none
    plugin = tmp_path / "jax_plugins" / "xla_fake_gpu"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not host_memory.runs_on_cpu()
    assert not host_memory.keep_freed_host_memory()


RELEASE = textwrap.dedent("""
    from mathgrpo.utils import host_memory
    assert host_memory.keep_freed_host_memory()
    import numpy as np

    def rss():  # resident pages of this process
        return int(open("/proc/self/statm").read().split()[1])

    blocks = [np.ones(2**20) for _ in range(512)]  # 512 × 8 MiB chunks from the heap, touched
    full = rss()
    del blocks
    kept = rss()  # freed, but kept by the heap (no trimming)
    released = host_memory.release_freed_host_memory()
    print(full, kept, rss(), released)
""")


def test_release_gives_kept_memory_back():
    """With the settings freed chunks stay resident (that is their point); release hands them back."""
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, env=env,
                          timeout=300, check=True)
    full, kept, after, released = done.stdout.split()
    pages = 512 * 2**23 // 4096  # 4 GiB in 4 KiB pages
    assert int(kept) > int(full) - pages // 10, "the settings keep freed memory resident"
    assert released == "True" and int(after) < int(kept) - 0.9 * pages, (full, kept, after)
