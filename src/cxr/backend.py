"""What differs between Keras backends: devices, threads, determinism, several devices and
gradients. Everything else (models, augmentation, training, evaluation, serving) is Keras 3
and runs on either.

`KERAS_BACKEND` picks the backend when Keras is first imported: `tensorflow` (the default,
and the one the requirements install) or `jax` (`pip install "jax[cpu]"`, or the `jax-cuda`
extra on a GPU machine). One process runs one backend.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import keras

from cxr.errors import CxrError

DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def name() -> str:
    """`tensorflow` or `jax` (what KERAS_BACKEND chose)."""
    return keras.backend.backend()


def set_threads(threads: int) -> int:
    """Use `threads` CPU threads for the operations where the backend lets a running process
    choose; return the count in effect. TensorFlow: both thread pools, before its runtime
    starts (once it runs, its pools stay). JAX: XLA sizes its CPU pool from the cores this
    process may use (its CPU affinity) when it starts, and has no setting after that."""
    if name() != "tensorflow":
        return len(os.sched_getaffinity(0))
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime already runs (tests, notebooks): keep its pools
        return tf.config.threading.get_intra_op_parallelism_threads() or threads
    return threads


def gpu_capabilities() -> list[int]:
    """The compute capability's major version of each visible GPU (0 where unknown)."""
    if name() == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform in ("gpu", "cuda", "rocm")]
        return [int(str(getattr(d, "compute_capability", "0")).split(".")[0]) for d in gpus]
    import tensorflow as tf

    majors = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        majors.append((details.get("compute_capability") or (0, 0))[0])
    return majors


def request_determinism() -> None:
    """Ask for deterministic GPU operations, before the backend starts. JAX: XLA's flag,
    which XLA reads once when it starts; in a process where JAX already runs on a GPU
    without it, fail with how to set it. TensorFlow: nothing to do yet (`make_deterministic`)."""
    if name() != "jax":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_FLAG in flags.split():
        return
    from jax._src import xla_bridge  # private: pinned by tests/test_private_apis.py

    if xla_bridge.backends_are_initialized():
        if gpu_capabilities():
            raise CxrError(
                "deterministic training on a GPU with JAX needs XLA's flag set before JAX "
                f'starts: run with XLA_FLAGS="{DETERMINISTIC_FLAG}", or set '
                "train.deterministic to auto or false"
            )
        return  # XLA on a CPU is deterministic without it
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()


def make_deterministic() -> None:
    """Deterministic operations from now on in this process (TensorFlow has no public way
    back). JAX: `request_determinism` set XLA's flag before it started."""
    if name() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def distribution() -> Any:
    """Data parallelism over this process's devices when it has several, else None:
    TensorFlow's MirroredStrategy over its GPUs, or Keras' DataParallel over JAX's devices
    (GPUs; CPUs too when XLA is told to make several, as the tests do). Both have
    `.scope()`; the batch is split across the devices, so a global batch is
    `batch_size * replicas(...)`."""
    if name() == "jax":
        import jax

        return keras.distribution.DataParallel() if jax.device_count() > 1 else None
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else None


def replicas(dist: Any) -> int:
    """How many devices share each batch under `dist` (a `distribution()`)."""
    if dist is None:
        return 1
    if hasattr(dist, "num_replicas_in_sync"):
        return dist.num_replicas_in_sync
    return len(dist.device_mesh.devices.flatten())


def scope(dist: Any):
    """The context to build a model in for `dist` (a `distribution()`)."""
    return contextlib.nullcontext() if dist is None else dist.scope()


def value_and_grad(fn: Callable, x) -> tuple[Any, Any]:
    """((value, aux), gradient of value with respect to x) of `fn(x) -> (value, aux)`,
    `value` a scalar: the one piece of differentiation outside Keras' own training step
    (Grad-CAM). Keras 3 has no backend-neutral gradient."""
    if name() == "jax":
        import jax

        return jax.value_and_grad(fn, has_aux=True)(x)
    if name() == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value, aux = fn(x)
        return (value, aux), tape.gradient(value, x)
    raise CxrError(f"Keras backend {name()!r} is not supported: use tensorflow or jax")


def hide_gpus_from_tensorflow() -> None:
    """With JAX training on the GPUs, keep TensorFlow (imported for TensorBoard's summaries
    and tf.data) off them: it would take the GPUs' memory the moment it starts."""
    if name() == "jax":
        with contextlib.suppress(ImportError, RuntimeError):
            import tensorflow as tf

            tf.config.set_visible_devices([], "GPU")
