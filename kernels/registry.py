"""The registry of attention implementations: the one piece of global state.

A kernel is one file that calls `register_kernel(...)`: in this package's `impls/`, or
outside it as a plugin (see plugins.py). The public API, the CLI, the sweep and the planners
read this table and nothing else, so everything they need to know about a kernel is declared
in that call.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from attnlab.kernels.masks import OPTIONS, PLAIN, Variant
from attnlab.models import AttentionMemory
from attnlab.schema import (BACKWARD, DECODE, FWD_BWD, KERNEL_MODES as MODES,  # noqa: F401  (the API names them
                            PREFILL)                                                # here too)

@dataclass(frozen=True)
class Availability:
    """Whether an implementation can run; `reason` says why not, and `argument`, where one of
    the call's own inputs is at fault ("q", "k", "v", "causal" or "scale"), which one. `broken`:
    the probe itself raised or answered out of contract, a fault of the implementation rather
    than of this machine."""

    ok: bool
    reason: str = ""
    argument: str = ""
    broken: bool = False

    def __bool__(self) -> bool:
        return self.ok


YES = Availability(True)


def no(reason: str, argument: str = "") -> Availability:
    return Availability(False, reason, argument)


def contiguous_head_dim(q, k, v, causal=None, scale=None) -> Availability:
    """An input rule of fused kernels that read head_dim as contiguous vectors (torch's fused
    SDPA backends refuse anything else; flash-attn asserts it of a KV cache)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            return no(f"needs a contiguous head_dim (stride 1), got stride {t.stride(-1)}", name)
    return YES


@dataclass(frozen=True)
class Implementation:
    """One attention implementation and what the lab knows of it; made by `register_kernel`,
    whose docstring says what each field means."""

    name: str
    description: str
    dtypes: tuple
    head_dims: Callable[[int], bool]
    head_dims_text: str
    devices: tuple
    probe: Callable[[str], Availability]
    prefill: Optional[Callable] = None
    decode: Optional[Callable] = None
    speed_rank: dict = field(default_factory=dict)
    limits: Optional[Callable[[str, torch.dtype, int], Availability]] = None
    input_rules: Optional[Callable[..., Availability]] = None
    prepare_decode: Optional[Callable] = None
    emulated_on: tuple = ()
    ablation_of: str = ""
    memory: Optional[Callable[[str], AttentionMemory]] = None
    baseline: bool = False
    prefill_partner: str = ""
    tune: Optional[Callable] = None
    options: tuple = ()
    varlen: Optional[Callable] = None
    builds: Optional[Callable] = None
    paged: Optional[Callable[[int], bool]] = None   # page sizes its decode takes; None: contiguous caches only
    paged_text: str = "-"
    kv_dtypes: tuple = ()
    origin: str = ""
    backward: Optional[Callable] = None
    varlen_backward: Optional[Callable] = None
    prefill_lse: Optional[Callable] = None
    backward_options: tuple = ()
    backward_limits: Optional[Callable[[str, torch.dtype, int], Availability]] = None
    decode_workspace: bool = False

    def attention_memory(self, device_type: str) -> AttentionMemory:
        """What one call, prefill or decode, allocates beyond its inputs and output on this
        device type: the memory models of the sweep and the end-to-end planner read this."""
        return self.memory(device_type) if self.memory else AttentionMemory()

    @property
    def decode_reads_lengths_on_host(self) -> bool:
        """Decode needs cache_seqlens on the host: read once when prepared, but a plain
        `decode` call syncs every time, so it cannot be captured in a CUDA graph."""
        return self.prepare_decode is not None

    @property
    def modes(self) -> tuple:
        """The modes it serves: a backward serves both the backward alone and forward plus backward."""
        return tuple(m for m in MODES if getattr(self, _CALL_OF_MODE.get(m, m)) is not None)

    def available(self, device: str | torch.device = "cuda") -> Availability:
        """Can this implementation run on `device` (a device type such as "cuda" or "cpu")?"""
        device_type = torch.device(device).type
        if device_type not in self.devices:
            return no(f"runs on {', '.join(self.devices)}, not {device_type}")
        return _cached_probe(self.name, device_type)

    def supports(self, mode: str, dtype: torch.dtype, head_dim: int, device_type: str = "cuda") -> Availability:
        if mode not in self.modes:
            return no(f"serves {', '.join(self.modes)}, not {mode}")
        if dtype not in self.dtypes:
            return no(f"dtypes {', '.join(_dtype_name(d) for d in self.dtypes)}, not {_dtype_name(dtype)}")
        if not self.head_dims(head_dim):
            return no(f"head_dim {self.head_dims_text}, not {head_dim}")
        status = self.limits(device_type, dtype, head_dim) if self.limits else YES
        if status and mode in _BACKWARD_MODES and self.backward_limits:
            status = self.backward_limits(device_type, dtype, head_dim)
        return status

    def serves(self, mode: str, q: torch.Tensor, k=None, v=None, causal: bool = False,
               scale: float = 1.0, variant: Variant = PLAIN, varlen: bool = False, page_size: int = 0,
               kv_dtype: Optional[torch.dtype] = None) -> Availability:
        """Can this implementation run `mode` for these (batch, seqlen, heads, head_dim) tensors:
        on q's device, dtype and head_dim, with the variant's options (and packed, with `varlen`),
        over a cache in pages of `page_size` tokens (0: contiguous) stored in `kv_dtype` (default
        k's dtype, or q's), and, where k and v are given, by its input rules?"""
        device_type = q.device.type
        status = self.available(device_type)
        if status:
            status = self.supports(mode, q.dtype, q.shape[-1], device_type)
        if status:
            status = self.takes(variant, varlen, mode)
        if status:
            status = self.takes_cache(q.dtype, page_size, kv_dtype or (k.dtype if k is not None else q.dtype))
        if status and k is not None and self.input_rules and not varlen:
            status = self.input_rules(q, k, v, causal, scale)
        return status

    def takes(self, variant: Variant = PLAIN, varlen: bool = False, mode: str = PREFILL) -> Availability:
        """Does this implementation take these options in `mode`? A refusal names the option as its argument."""
        backward = mode in _BACKWARD_MODES
        if varlen and (self.varlen_backward if backward else self.varlen) is None:
            what = "a backward of packed sequences (varlen_backward)" if backward else "packed sequences (varlen)"
            return no(f"does not take {what}", "cu_seqlens_q")
        options = self.backward_options if backward else self.options
        for option in variant.used():
            if option not in options:
                where = " in its backward" if backward and option in self.options else ""
                return no(f"does not support {option}{where} (it takes: {', '.join(options) or 'no options'})",
                          option)
        return YES

    def takes_cache(self, dtype: torch.dtype, page_size: int = 0,
                    kv_dtype: Optional[torch.dtype] = None) -> Availability:
        """Does its decode take a KV cache in pages of `page_size` tokens (0: contiguous), stored in
        `kv_dtype` (None: q's `dtype`)? A refusal names block_table or k_cache as its argument."""
        if page_size and self.paged is None:
            return no("takes contiguous caches only, not a paged one", "block_table")
        if page_size and not self.paged(page_size):
            return no(f"takes pages of {self.paged_text} tokens, not {page_size} (k_cache's dim 1)", "k_cache")
        if kv_dtype not in (None, dtype, *self.kv_dtypes):
            taken = ", ".join(_dtype_name(d) for d in (dtype, *self.kv_dtypes))
            return no(f"takes caches in {taken} with q in {_dtype_name(dtype)}, not {_dtype_name(kv_dtype)}", "k_cache")
        return YES


_BACKWARD_MODES = (BACKWARD, FWD_BWD)
_CALL_OF_MODE = {BACKWARD: "backward", FWD_BWD: "backward"}   # the declared call that serves a mode
_REGISTRY: dict[str, Implementation] = {}
DEFAULT_SPEED_RANK = 100     # after every in-tree kernel: `auto` picks a plugin only where nothing else runs
AUTO = "auto"                # the API's "choose for me": never an implementation's name
_IN_TREE: set = set()        # names the kernels of impls/ registered: reserved for them
_in_tree_loading = False     # set while impls/ is imported
_REFUSED_FILES: dict = {}    # a plugin file that ran past its time limit -> why what it registers is refused
_THREAD = threading.local()  # .gate: the RegistrationGate of a plugin imported in this thread
_LOCK = threading.RLock()    # a registration and the closing of a gate do not interleave


class RegistrationGate:
    """Lets the registrations of the thread that entered it count until it is closed: a plugin
    imported in a thread of its own, and left running past its time limit, registers nothing
    that counts from then on."""

    def __init__(self) -> None:
        self.reason = ""

    def enter(self) -> None:
        """Called in the importing thread."""
        _THREAD.gate = self

    def close(self, reason: str) -> None:
        with _LOCK:
            self.reason = reason


def refuse_file(path: str, reason: str) -> None:
    """Refuse every later registration made from the file `path` (a plugin past its time limit,
    or a thread it started), saying `reason`."""
    with _LOCK:
        _REFUSED_FILES[os.path.realpath(path)] = reason


@contextmanager
def in_tree_registrations():
    """Mark what registers inside as the lab's own (impls/): those names stay reserved, and an
    in-tree kernel takes its name back from anything that registered it first."""
    global _in_tree_loading
    _in_tree_loading = True
    try:
        yield
    finally:
        _in_tree_loading = False


def register_kernel(name: str, *, prefill: Optional[Callable] = None, decode: Optional[Callable] = None,
                    devices, dtypes, head_dims=None, description: str = "",
                    probe: Optional[Callable[[str], Availability]] = None, speed_rank=None,
                    limits: Optional[Callable] = None, input_rules: Optional[Callable] = None,
                    prepare_decode: Optional[Callable] = None, memory=None, emulated_on=(),
                    ablation_of: str = "", baseline: bool = False, prefill_partner: str = "",
                    tune: Optional[Callable] = None, options=(), varlen: Optional[Callable] = None,
                    builds: Optional[Callable] = None, paged=None, kv_dtypes=(), backward: Optional[Callable] = None,
                    varlen_backward: Optional[Callable] = None, prefill_lse: Optional[Callable] = None,
                    backward_options=None, backward_limits: Optional[Callable] = None,
                    decode_workspace: bool = False) -> Implementation:
    """Add an attention implementation to the lab; returns what was registered.

    The calls, on tensors in the (batch, seqlen, heads, head_dim) layout that the API has
    already checked:
      `prefill(q, k, v, causal, scale)` -> (batch, seqlen_q, heads, head_dim); causal is
          bottom-right aligned, and a query row that sees no key is zeros;
      `decode(q, k_cache, v_cache, cache_seqlens, scale)` -> like q; sequence b attends to the
          first cache_seqlens[b] slots, its q_len queries being the last of them.
    At least one is given. Beyond plain attention (see masks.py for the rules):
      `options`: which of "window" and "softcap" the calls take; they then receive `window=(left,
          right)` and `softcap=s` as keywords, only when a call sets them. The API refuses an
          option an implementation does not declare, naming it, and never drops it.
      `varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)`:
          packed sequences, q (total_q, heads, head_dim), k and v (total_k, kv_heads, head_dim),
          cu_seqlens int32 (batch + 1,); the options as for prefill.
    What the lab needs to know besides, with its default:
      `devices`: device types it runs on ("cpu", "cuda"); `dtypes`: torch dtypes or their names;
      `head_dims`: None (any), a range or collection of sizes, or (predicate, text);
      `probe(device_type)`: whether it runs here (an optional package, a GPU generation), as
          `YES` or `no(reason)`; asked once per process and device type. Default: yes.
      `speed_rank`: a number, or {device_type: number}; `impl="auto"` tries lower first.
      `limits(device_type, dtype, head_dim)` and `input_rules(q, k, v, causal, scale)`: refusals
          known before any tensor exists, and refusals of one call's inputs, as `no(reason,
          argument)`; `auto` moves on to the next fastest. Decode passes the caches as k, v.
      `prepare_decode(q, k_cache, v_cache, cache_seqlens, scale)`: host work done once, returning
          the call; declaring it says that decode reads the lengths on the host (so a plain call
          syncs and cannot be captured in a CUDA graph).
      `decode_workspace`: decode takes `workspace=`, a dict that a prepared call owns and passes
          to each of its calls, to keep scratch buffers in from the first call on.
      `memory`: what a call allocates beyond inputs and output, an AttentionMemory or
          `memory(device_type)`; default nothing (K and V streamed in place, as a fused kernel
          does). The sweep's OOM prediction and the end-to-end batch planner read it.
      `emulated_on`: device types where it runs only in an emulator (right, but its times say
          nothing about the kernel); sweeps leave it out there unless named.
      `ablation_of`: the implementation this one is with one feature turned off; `auto` and the
          sweeps' defaults leave it out.
      `baseline`: one a user would otherwise use, to compare new kernels against.
      `prefill_partner`: for a decode-only kernel, the prefill of its family, so an end-to-end
          run measures one stack.
      `tune(q, k, v, causal, scale)`: where the kernel autotunes, a list of dicts, one per variant
          tuned, with what each chose and every candidate's time (`attnlab tune`).
      `builds(capability)`: for a Triton kernel, the launches of a call as kernels/inspect.py's
          `Build`s for the llama3-8b shapes, so `attnlab inspect` shows what they compile to.
      `paged`: the page sizes its decode takes from a paged cache (None: contiguous caches only;
          True: any; a range or collection of sizes; or (predicate, text)). Its decode then
          receives `block_table=` when a call passes one, the caches being (num_blocks,
          page_size, kv_heads, head_dim), as in flash-attn.
      `kv_dtypes`: cache dtypes its decode takes besides q's own (torch.float8_e4m3fn,
          torch.float8_e5m2, or their names); it then receives `k_descale=`, `v_descale=`
          (float32 (batch, kv_heads)) when a call passes them. kernels/paged.py has helpers.
    Training (the API's outputs carry gradients where `backward` is declared; modes "backward"
    and "fwd_bwd"):
      `backward(q, k, v, causal, scale)` -> (out, grads): the forward, keeping what the backward
          needs; `grads(dout)` -> (dq, dk, dv) in the shapes and dtypes of q, k, v, dk and dv
          summed over each kv head's group of query heads. `grads` may be called many times on
          the same saved state (the bench times it alone). A row that sees no key has out 0 and
          adds no gradient: no NaN anywhere. `autograd_backward(prefill)` makes one from any
          differentiable forward.
      `varlen_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
          scale)` -> (out, grads): the same over packed sequences (`autograd_varlen_backward`).
      `backward_options`: the options the backward calls take, some of `options` (default: all);
          `backward_limits(device_type, dtype, head_dim)`: refusals of the backward beyond `limits`.
      `prefill_lse(q, k, v, causal, scale)` -> (out, lse): prefill's output and each row's
          log-sum-exp of its scaled (capped) visible scores, (batch, heads, seqlen_q) in float32
          (float64 for float64 input), -inf for a row that sees no key; ring attention's local step.
    A lazy("module:function") serves as any of these calls.
    """
    impl = Implementation(
        name=_checked_name(name), description=description, dtypes=_dtypes(dtypes),
        head_dims=_head_dims(head_dims)[0], head_dims_text=_head_dims(head_dims)[1],
        devices=_names("devices", devices), probe=probe or (lambda device_type: YES),
        prefill=_callable("prefill", prefill), decode=_callable("decode", decode),
        speed_rank=_speed_rank(speed_rank, devices), limits=limits, input_rules=input_rules,
        prepare_decode=prepare_decode, emulated_on=_names("emulated_on", emulated_on, empty=True),
        ablation_of=ablation_of, memory=_memory(memory), baseline=bool(baseline),
        prefill_partner=prefill_partner, tune=tune, options=_options(options),
        varlen=_callable("varlen", varlen), builds=_callable("builds", builds), paged=_page_sizes(paged)[0],
        paged_text=_page_sizes(paged)[1], kv_dtypes=_dtypes(kv_dtypes, "kv_dtypes", empty=True),
        origin=_caller_module(),
        backward=_callable("backward", backward), varlen_backward=_callable("varlen_backward", varlen_backward),
        prefill_lse=_callable("prefill_lse", prefill_lse),
        backward_limits=_callable("backward_limits", backward_limits),
        backward_options=_backward_options(backward_options, options), decode_workspace=bool(decode_workspace))
    if impl.prefill is None and impl.decode is None:
        raise ValueError(f"prefill: {name!r} registers neither prefill nor decode; give at least one")
    with _LOCK:
        _check_free(name, impl.origin)
        _REGISTRY[name] = impl
        if _in_tree_loading:
            _IN_TREE.add(name)
    return impl


def _check_free(name: str, origin: str) -> None:
    """ValueError naming `name` where it is not this registration's to take."""
    refused = getattr(getattr(_THREAD, "gate", None), "reason", "") or _REFUSED_FILES.get(os.path.realpath(origin))
    if refused:
        raise ValueError(f"name: {name!r} was not registered: {refused}")
    if _in_tree_loading and name not in _IN_TREE:
        return      # the lab's own kernel: its name is its own whatever registered it first
    if name in _IN_TREE and not _in_tree_loading:
        raise ValueError(f"name: {name!r} is the name of an in-tree kernel (kernels/impls); expected a name of "
                         f"your own")
    if name in _REGISTRY:
        raise ValueError(f"name: implementation {name!r} is already registered (by {_REGISTRY[name].origin})")


def _options(options) -> tuple:
    options = (options,) if isinstance(options, str) else tuple(options)
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"options: expected some of {', '.join(OPTIONS)}, got {', '.join(map(repr, unknown))}")
    return options


def _backward_options(backward_options, options) -> tuple:
    """The options a backward takes: some of the forward's (`options`), by default all of them."""
    if backward_options is None:
        return _options(options)
    taken, declared = _options(backward_options), _options(options)
    extra = [o for o in taken if o not in declared]
    if extra:
        raise ValueError(f"backward_options: expected some of the options {declared or '()'}, got "
                         f"{', '.join(map(repr, extra))} besides")
    return taken


def _checked_name(name) -> str:
    if not isinstance(name, str) or not name or name != name.strip() or "," in name:
        raise ValueError(f"name: expected a non-empty name without commas or edge spaces, got {name!r}")
    if name == AUTO:
        raise ValueError(f"name: {AUTO!r} is reserved (impl={AUTO!r} asks the API to choose an implementation); "
                         f"expected another name")
    return name


def _callable(argument: str, fn):
    if fn is not None and not callable(fn):
        raise ValueError(f"{argument}: expected a callable, got {type(fn).__name__}")
    return fn


def _names(argument: str, values, empty: bool = False) -> tuple:
    values = (values,) if isinstance(values, str) else tuple(values)
    if (not values and not empty) or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{argument}: expected device types such as 'cpu' or 'cuda', got {values!r}")
    return values


def _dtypes(dtypes, argument: str = "dtypes", empty: bool = False) -> tuple:
    dtypes = (dtypes,) if isinstance(dtypes, (str, torch.dtype)) else tuple(dtypes)
    found = tuple(getattr(torch, d, None) if isinstance(d, str) else d for d in dtypes)
    if (not found and not empty) or not all(isinstance(d, torch.dtype) for d in found):
        raise ValueError(f"{argument}: expected torch dtypes or their names ('bfloat16'), got {dtypes!r}")
    return found


def _page_sizes(paged) -> tuple:
    """(predicate or None, text) from None, True, a range or collection of page sizes, or (predicate, text)."""
    if paged is None:
        return None, "-"
    if paged is True:
        return (lambda size: size >= 1), "any"
    try:
        return _head_dims(paged)
    except (ValueError, TypeError):
        raise ValueError(f"paged: expected None, True, a range or collection of page sizes, or (predicate, text), "
                         f"got {paged!r}") from None


def _head_dims(spec) -> tuple:
    """(predicate, text) from None, a range, a collection of sizes or (predicate, text)."""
    if spec is None:
        return (lambda d: d >= 1), "any"
    if isinstance(spec, range):
        step = f" in steps of {spec.step}" if spec.step > 1 else ""
        return (lambda d: d in spec), f"{spec.start} to {spec[-1]}{step}" if len(spec) else "none"
    if isinstance(spec, tuple) and len(spec) == 2 and callable(spec[0]):
        return spec[0], str(spec[1])
    sizes = tuple(sorted(spec)) if not isinstance(spec, (str, bytes)) else ()
    if not sizes or not all(isinstance(d, int) and d >= 1 for d in sizes):
        raise ValueError(f"head_dims: expected None, a range, sizes or (predicate, text), got {spec!r}")
    return (lambda d: d in sizes), ", ".join(map(str, sizes))


def _speed_rank(rank, devices) -> dict:
    if rank is None:
        return {}
    if isinstance(rank, (int, float)):
        return {d: rank for d in _names("devices", devices)}
    if isinstance(rank, dict) and all(isinstance(v, (int, float)) for v in rank.values()):
        return dict(rank)
    raise ValueError(f"speed_rank: expected a number or {{device_type: number}}, got {rank!r}")


def _memory(memory):
    if memory is None or callable(memory):
        return memory
    if isinstance(memory, AttentionMemory):
        return lambda device_type: memory
    raise ValueError(f"memory: expected an AttentionMemory or memory(device_type), got {type(memory).__name__}")


def _caller_module() -> str:
    """The module that called register_kernel: where `attnlab kernels` says it came from."""
    frame = sys._getframe(2)
    return frame.f_globals.get("__file__") or frame.f_globals.get("__name__", "?")


def implementations() -> list[Implementation]:
    """All registered implementations, in registration order."""
    return list(_REGISTRY.values())


def unregister(name: str) -> None:
    """Remove an implementation (tests register their own for one test)."""
    _REGISTRY.pop(name, None)
    _cached_probe.cache_clear()


def get(name: str) -> Implementation:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"impl: unknown implementation {name!r}; known: {', '.join(_REGISTRY)}") from None


def roles(name: str) -> dict:
    """A registered implementation's roles, as records carry them (`attnlab.schema.ROLE_FIELDS`):
    `family`, the implementation its `ablation_of` and `prefill_partner` lead to (itself where it
    declares neither; a name nothing registers ends the chain), `ablation_of` as declared, and
    `baseline`. triton-decode-nopdl, an ablation of triton-decode, whose prefill partner is
    triton, is of family triton. ValueError naming `name` where nothing registers it."""
    impl = get(name)
    family, seen = impl.name, {impl.name}
    while family in _REGISTRY:
        parent = _REGISTRY[family].ablation_of or _REGISTRY[family].prefill_partner
        if not parent or parent in seen:      # a root, or a loop of declarations: stop where it closes
            break
        family = parent
        seen.add(parent)
    return {"family": family, "ablation_of": impl.ablation_of, "baseline": impl.baseline}


@functools.lru_cache(maxsize=None)
def _cached_probe(name: str, device_type: str) -> Availability:
    # Optional backends are detected once per process and device type.
    try:
        status = _REGISTRY[name].probe(device_type)
    except BaseException as exc:  # a probe that breaks, even by SystemExit, means "not here", with the reason
        if isinstance(exc, KeyboardInterrupt):
            raise
        return Availability(False, f"probe failed: {one_line(exc)}", broken=True)
    if isinstance(status, Availability):
        return status
    if status is True:
        return YES
    return Availability(False, one_line(f"probe returned {status!r}, expected YES or no(reason)"), broken=True)


def one_line(text) -> str:
    """An exception as `Type: message`, or any text, on one line."""
    if isinstance(text, BaseException):
        text = f"{type(text).__name__}: {text}" if str(text) else type(text).__name__
    return " ".join(str(text).split())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def lazy(target: str, **options) -> Callable:
    """A call to "module:function", imported on first use, with `options` as keywords (and the
    keywords each call passes).

    Triton chooses compiler or interpreter when a module's @triton.jit functions are defined,
    so a Triton kernel's module is imported only once a command has made that choice.
    """
    module_name, _, function = target.partition(":")
    if not module_name or not function:
        raise ValueError(f"target: expected 'module:function', got {target!r}")

    def call(*args, **per_call):      # per_call: the options a call sets (window=, softcap=)
        import importlib
        return getattr(importlib.import_module(module_name), function)(*args, **options, **per_call)
    call.__qualname__ = f"lazy({target!r})"
    return call


def autograd_backward(forward: Callable, context: Optional[Callable] = None) -> Callable:
    """A `backward` made from a differentiable `forward(q, k, v, causal, scale, **options) -> out`:
    the forward runs on detached leaves that require grad, and `grads(dout)` asks autograd for
    their gradients, keeping the graph so that it may be asked again. `context()`, where given,
    is entered around the forward and around each `grads` (torch's SDPA pins its backend so)."""
    def backward(q, k, v, causal, scale, **options):
        return _through_autograd(lambda *leaves: forward(*leaves, causal, scale, **options), (q, k, v), context)
    backward.__qualname__ = f"autograd_backward({_call_name(forward)})"
    return backward


def autograd_varlen_backward(varlen_forward: Callable, context: Optional[Callable] = None) -> Callable:
    """A `varlen_backward` made from a differentiable `varlen_forward`, as `autograd_backward` does."""
    def varlen_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, **options):
        packed = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
        return _through_autograd(lambda *leaves: varlen_forward(*leaves, *packed, **options), (q, k, v), context)
    varlen_backward.__qualname__ = f"autograd_varlen_backward({_call_name(varlen_forward)})"
    return varlen_backward


def _through_autograd(forward: Callable, inputs: tuple, context: Optional[Callable]) -> tuple:
    """(out, grads) of `forward(*inputs)` by autograd; an input the output does not reach gets zeros."""
    context = context or contextlib.nullcontext
    leaves = tuple(t.detach().requires_grad_() for t in inputs)
    with torch.enable_grad(), context():
        out = forward(*leaves)

    def grads(dout: torch.Tensor) -> tuple:
        if not out.requires_grad:     # an output of zeros only (no row sees a key) depends on nothing
            return tuple(torch.zeros_like(t) for t in leaves)
        with torch.enable_grad(), context():
            return torch.autograd.grad(out, leaves, dout, retain_graph=True, allow_unused=True,
                                       materialize_grads=True)
    return out.detach(), grads


def _call_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__", type(fn).__name__)


def triton_probe(device_type: str) -> Availability:
    """Whether Triton kernels run on this device type: in the interpreter on a CPU, compiled on
    a GPU of compute capability 8.0 or later (bf16 tensor cores)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return no(f"triton not importable ({type(exc).__name__}: {exc})")
    if device_type == "cpu":
        if not triton_interpreting():
            return no("on a CPU Triton runs only in its interpreter: set TRITON_INTERPRET=1")
        return YES
    if triton_interpreting():
        return no("TRITON_INTERPRET=1 is set: Triton kernels run on the CPU, not on this GPU")
    return cuda_capability(8, "bf16 tensor cores")


def cuda_capability(minimum: int, why: str) -> Availability:
    """YES where torch sees a CUDA GPU of compute capability `minimum`.0 or later, which `why` needs."""
    if not torch.cuda.is_available():
        return no("no CUDA device")
    major, minor = torch.cuda.get_device_capability()
    if major < minimum:
        return no(f"needs compute capability {minimum}.0+ for {why}, found {major}.{minor}")
    return YES


def triton_interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
