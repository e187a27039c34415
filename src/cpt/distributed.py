"""Several processes: one strategy object that the loop asks about sharding, saving and resuming.

Three strategies, chosen once from the launch and the config:
- single: one process (nothing to do).
- ddp:    every rank holds the whole model; accelerate wraps it in DistributedDataParallel, which
          averages gradients across ranks after each backward.
- fsdp:   FSDP2 (torch's `fully_shard`): every parameter, gradient and optimizer state is split across
          the ranks; each decoder layer is gathered just before it runs and freed after. The root
          unit is the transformers causal LM inside peft's wrappers, so the trained embed_tokens /
          lm_head copies (tied or not) live in one unit, and `generate` (which calls the causal LM,
          not the PeftModel) still gathers them.

FSDP goes through `fully_shard` directly rather than accelerate's FSDP plugin: the plugin is not
available on CPU (the tests run FSDP2 with gloo), and it reduces gradients in bf16 where we want
float32. accelerate still starts the processes, places devices, reduces counts and clips.

Checkpoints are written the same way under every strategy: the trained tensors and the optimizer
state are gathered into full, unsharded tensors keyed by parameter name, so a checkpoint resumes on
any number of processes and under any strategy (see docs/distributed.md for the rule).

    torchrun --nproc_per_node 2 -m cpt.cli train examples/quickstart.yaml train.fsdp=true
    python -m pytest tests/test_distributed.py -q
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

from cpt import checkpoint as ckpt
from cpt.config import Config, ConfigError
from cpt.model import load_trainable_state, param_groups, save_trained, trainable_state
from cpt.runtime import launched_with_fsdp, launched_world_size, local_device, mixed_precision, resolve_dtype, same_device

log = logging.getLogger("cpt")

Strategy = Literal["single", "ddp", "fsdp"]


def mixed_precision_mode(cfg: Config, device: torch.device, dtype: torch.dtype) -> str:
    """'no', 'bf16' or 'fp16' (the same rule as single-process training)."""
    return mixed_precision(device, dtype, bf16=cfg.train.bf16, fp16=cfg.train.fp16)


def _forget_last_run() -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    mixed precision ("restart your runtime"): a notebook or a test that trains a bf16 run and then a
    float32 one would fail. Each run starts from a fresh state; the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)


def build_accelerator(cfg: Config, device: Optional[torch.device] = None) -> Any:
    """The accelerate.Accelerator for this launch: starts the process group under torchrun /
    accelerate launch (gloo on CPU, nccl on GPU) and picks this rank's device. `device`: where the
    caller's model already is (the Python API), else the GPU if there is one.

    It is built before the model so that each rank loads its model onto its own GPU."""
    from accelerate import Accelerator

    device = torch.device(device) if device is not None else local_device()
    mp = mixed_precision_mode(cfg, device, resolve_dtype(cfg.model.dtype, device))
    sharding = _fsdp_wanted(cfg) and launched_world_size() > 1
    if sharding:
        if mp == "fp16":
            raise ConfigError("train.fsdp with fp16 is not supported (sharded gradients need a sharded loss scaler); "
                              "use train.bf16=true, or train.fsdp=false")
        if cfg.model.load_in_4bit:
            raise ConfigError("train.fsdp with model.load_in_4bit (QLoRA) is not supported; shard a bf16 base instead "
                              "(set model.load_in_4bit=false), or train on one GPU per run")
        if cfg.train.optim == "adamw_8bit":
            raise ConfigError("train.fsdp with train.optim=adamw_8bit is not supported (bitsandbytes cannot step "
                              "sharded tensors); use train.optim=adamw_torch")
    if sharding and device.type == "cuda" and not torch.distributed.is_initialized():
        # Host-memory shards (fsdp_offload_params) make the gradient norm and the gathering for a save
        # run collectives on host tensors: give the process group gloo beside nccl, as accelerate
        # does for its own FSDP offload. accelerate then uses this group.
        torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="cuda:nccl,cpu:gloo")
    # The model is sharded by us (fsdp) or wrapped by accelerate (ddp); the environment's FSDP switch
    # must not make accelerate apply its own plugin on top, so it is read here and then hidden.
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    _forget_last_run()
    try:
        accelerator = Accelerator(mixed_precision=mp, cpu=device.type == "cpu")
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved
    if not accelerator.is_main_process and log.getEffectiveLevel() < logging.WARNING:
        # N copies of every progress line help nobody; warnings and errors still come from every rank.
        log.setLevel(logging.WARNING)
    return accelerator


def _fsdp_wanted(cfg: Config) -> bool:
    return bool(cfg.train.fsdp) or launched_with_fsdp()


def loading_place(cfg: Config, accelerator: Any, device: Optional[torch.device]) -> tuple[Config, Optional[torch.device]]:
    """(config, device) for building the model. Under FSDP on GPUs the model is built in host memory,
    with the dtype and kernels it would get on the GPU, and `fully_shard` then moves only this rank's
    shards to its GPU: no GPU ever holds the whole model. (Each rank still reads the whole model
    into host memory once.) Otherwise: unchanged."""
    if not (_fsdp_wanted(cfg) and accelerator.num_processes > 1 and accelerator.device.type == "cuda"):
        return cfg, device
    import copy


    built = copy.deepcopy(cfg)
    built.model.dtype = str(resolve_dtype(cfg.model.dtype, accelerator.device)).replace("torch.", "")
    if cfg.model.kernels == "auto":
        # On a CPU device the kernel set-up applies only the fused loss of 'cpt'; the host-memory
        # offload of frozen originals must not happen (FSDP shards them, and owns their placement).
        built.model.kernels = "cpt"
    return built, torch.device("cpu")


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside peft's PeftModel / LoraModel (or the model itself)."""
    inner = model
    for _ in range(3):
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        else:
            break
    return inner


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy of `t`; a sharded DTensor is gathered first (a collective: every rank calls)."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True)


def _reshard(model: nn.Module) -> None:
    """Put every FSDP unit back into its sharded state. The root unit does not reshard after its
    forward (see shard_model); after a no-grad forward (evaluation) no backward reshards it, and
    until something does the module attributes hold the gathered tensors, not the sharded
    parameters the optimizer steps."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def plain(t: Any) -> Any:
    """A DTensor result (e.g. the gradient norm under FSDP) as an ordinary tensor."""
    return t.full_tensor() if _is_dtensor(t) else t


@dataclass
class Snapshot:
    """A checkpoint's tensors, complete on the main process: trained tensors by (deduplicated)
    name, the optimizer state keyed by parameter name, and every rank's random streams."""
    trained: dict[str, torch.Tensor]
    optimizer: dict
    rngs: list[dict]
    adapter: Optional[dict[str, torch.Tensor]] = None  # under FSDP: gather_trained's dict, for save_trained


NAMED_FORMAT = "cpt-named-full-1"


def _named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with full tensors keyed by parameter name instead of by position, so
    it does not depend on how (or whether) the parameters are sharded. Collective under FSDP."""
    names = _param_names(model)
    order = [p for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    state = {}
    for i, p in enumerate(order):
        st = sd["state"].get(i)
        if st is not None:
            state[names[id(p)]] = {k: (_full(v) if _is_dtensor(v) else v) for k, v in st.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(order[j])] for j in g["params"]]}
              for g in sd["param_groups"]]
    return {"format": NAMED_FORMAT, "state": state, "param_groups": groups}


@dataclass
class Parallel:
    """How this run is spread over processes; the loop asks it, never `if fsdp` itself."""
    strategy: Strategy
    accelerator: Any
    world_size: int = 1

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    # ------------------------------------------------------------------ set-up

    @classmethod
    def setup(cls, cfg: Config, bundle: Any, accelerator: Any) -> "Parallel":
        """Choose the strategy; under FSDP shard the model now and rebuild the parameter groups
        (fully_shard replaces every parameter, and the optimizer must hold the new ones)."""
        world = int(accelerator.num_processes)
        if _fsdp_wanted(cfg) and world > 1:
            shard_model(bundle.model, cfg, accelerator)

            bundle.groups = param_groups(bundle.model, cfg)
            bundle.device = accelerator.device  # it may have been built in host memory (loading_place)
            strategy: Strategy = "fsdp"
        elif world > 1:
            strategy = "ddp"
        else:
            if cfg.train.fsdp:
                log.warning("train.fsdp is set but this is a single process: nothing to shard; training as usual")
            strategy = "single"
        if world > 1:
            log.info("distributed: %s on %d processes (%s backend)", strategy, world,
                     torch.distributed.get_backend() if torch.distributed.is_initialized() else "?")
        return cls(strategy=strategy, accelerator=accelerator, world_size=world)

    def anyone(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any. A decision that leads into collectives (stop
        and save after a signal that reached the ranks at different moments) must be taken by all
        ranks at the same step, or one rank gathers while another waits in the next all-reduce."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.accelerator.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """DDP (and autocast) through accelerate; an FSDP model is already sharded and keeps its
        plain optimizer (the optimizer steps on the local shards)."""
        if self.sharded:
            return model, optimizer
        if self.strategy == "ddp":
            # DDP would broadcast every parameter from rank 0 at start-up (16 GB for an 8B base) and
            # refuses a module whose parameters sit on two device types (frozen originals kept in
            # host memory). The frozen base is loaded identically on every rank and gets no
            # gradient: leave it out of DDP.
            model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
        # accelerate would call model.to(device) on a model that is already there (build_model put it
        # on this rank's device), which also pulls the frozen embedding originals that the kernels moved
        # to host memory back onto the GPU (about 2 GiB for an 8B model). Place it only if a trained
        # tensor is elsewhere.
        device = self.accelerator.device
        placed = all(same_device(p.device, device) for p in model.parameters() if p.requires_grad)
        return self.accelerator.prepare(model, optimizer, device_placement=[not placed, True])

    # ------------------------------------------------------------------ gathering for a save

    def gather_trained(self, model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
        """Under FSDP: every trained tensor, full and on the CPU, by every name it has (tied weights
        under both names, as model.state_dict() has them); a collective, complete on the main
        process. Unsharded: None (the model's own tensors are complete on every rank)."""
        if not self.sharded:
            return None
        _reshard(model)
        full: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if not p.requires_grad:
                continue
            if id(p) not in full:
                full[id(p)] = _full(p)
            out[name] = full[id(p)]
        return out

    def snapshot(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional["Snapshot"]:
        """What a checkpoint holds besides the schedule and the data position, complete on the main
        process (None elsewhere). Every rank must call it: under FSDP the tensors are gathered, and
        each rank's random streams are collected so that a resume on as many ranks restores them all."""
        rngs = self._gather_rng()
        inner = self.accelerator.unwrap_model(model)
        if self.sharded:

            everything = self.gather_trained(inner)
            trained = {n: everything[n] for n in trainable_state(inner)}
            optim = _named_optimizer_state(inner, optimizer)
            return Snapshot(trained, optim, rngs, adapter=everything) if self.is_main else None
        if not self.is_main:
            return None

        # Every rank holds the same full tensors: the main process writes its own, uncopied.
        return Snapshot(trainable_state(inner), _named_optimizer_state(inner, optimizer), rngs)

    def _gather_rng(self) -> list[dict]:

        mine = {"rng": ckpt.rng_state(), "torch": ckpt.torch_rng_state()}
        if self.world_size == 1:
            return [mine]
        everyone: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, mine)
        return everyone

    def save_trained(self, model: nn.Module, path: Path, tokenizer: Any, trained: Optional[dict]) -> None:
        """The adapter (or the whole model in full mode) in the same Hugging Face format as a
        single-process run. Main process only; under FSDP `trained` comes from `gather_trained`."""

        inner = self.accelerator.unwrap_model(model)
        if not self.sharded:
            save_trained(inner, path, tokenizer)
            return
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # peft picks the adapter's tensors (LoRA, modules_to_save) out of the state dict it is given;
        # transformers (full mode) writes the given tensors. Both would otherwise read sharded ones.
        inner.save_pretrained(path, state_dict=trained, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    def write_rank_rng(self, folder: Path, snap: "Snapshot") -> None:
        """rng.pt keeps the main process's streams (as a single-process run writes it); the other
        ranks' streams go to rng_ranks.pt."""
        if len(snap.rngs) > 1:
            torch.save({"ranks": snap.rngs[1:]}, folder / "rng_ranks.pt")

    def restore_rng(self, path: Path, saved: dict) -> None:
        """Restore this rank's random streams when the checkpoint was written on as many ranks."""

        written_on = int(saved.get("world_size", 1))
        if written_on != self.world_size:
            log.warning("resuming on %d processes from a checkpoint written on %d: random streams (dropout) restart "
                        "from the seed; the data position and every tensor continue exactly", self.world_size, written_on)
            return
        rank = int(self.accelerator.process_index)
        if rank == 0:
            ckpt.set_rng_state(saved["rng"], ckpt.load_torch(path / "rng.pt"))
            return
        ranks = path / "rng_ranks.pt"
        if not ranks.is_file():
            log.warning("%s has no random streams for rank %d; they restart from the seed", path, rank)
            return
        mine = ckpt.load_torch(ranks)["ranks"][rank - 1]
        ckpt.set_rng_state(mine["rng"], mine["torch"])

    # ------------------------------------------------------------------ resuming

    def load_trained(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy full trained tensors (from trainable.safetensors) into the model, sharding them
        under FSDP. Every rank reads the file and calls this (a collective under FSDP)."""

        model = self.accelerator.unwrap_model(model)
        if not self.sharded:
            load_trainable_state(model, state)
            return
        _reshard(model)
        params = dict(model.named_parameters())
        missing = [n for n in trainable_state(model) if n not in state]
        if missing:
            raise ValueError(f"checkpoint lacks trained tensors {missing[:3]}...; was it written by another configuration?")
        with torch.no_grad():
            for n, p in params.items():  # model order: the same on every rank
                if n in state:
                    p.copy_(_like(state[n], p))
        unknown = [n for n in state if n not in params]
        if unknown:
            raise ValueError(f"checkpoint tensor {unknown[0]!r} has no place in this model; was it written by another configuration?")

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
        """Load a full optimizer state: keyed by parameter name (any strategy writes this) or, from
        older checkpoints, by parameter index. Names make it independent of how the parameters are
        split; the order of the optimizer's parameters must only name the same tensors."""
        if self.sharded:
            _reshard(model)
        names = _param_names(self.accelerator.unwrap_model(model))
        order = [p for g in optimizer.param_groups for p in g["params"]]
        if saved.get("format") != NAMED_FORMAT:
            saved = _index_to_named(saved, [names[id(p)] for p in order])
        index = {names[id(p)]: i for i, p in enumerate(order)}
        saved_groups = saved["param_groups"]
        by_name = {g.get("name"): g for g in saved_groups}
        if len(by_name) == len(saved_groups) and all(g.get("name") in by_name for g in optimizer.param_groups):
            # Named groups (adapter, embeddings, ...) match by name: their order may change between versions.
            saved_groups = [by_name[g.get("name")] for g in optimizer.param_groups]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError("the checkpoint's optimizer has other parameter groups than this run's; "
                             "was it written by another configuration?")
        state = {}
        for name, st in saved["state"].items():
            if name not in index:
                raise ValueError(f"optimizer state for {name!r} has no parameter in this model")
            p = order[index[name]]
            state[index[name]] = {k: (_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v)
                                  for k, v in st.items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
                  for g in saved_groups]
        optimizer.load_state_dict({"state": state, "param_groups": groups})


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`full` shaped as `p` is held: split into this rank's shard when `p` is a DTensor."""
    if _is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        mesh = p.device_mesh
        return distribute_tensor(full.to(mesh.device_type, p.dtype), mesh, p.placements)
    return full.to(p.device, p.dtype)


def _param_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    return names


def _index_to_named(sd: dict, names_in_order: list[str]) -> dict:
    state = {names_in_order[int(i)]: st for i, st in sd["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names_in_order[int(i)] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"format": NAMED_FORMAT, "state": state, "param_groups": groups}


# ---------------------------------------------------------------------------- FSDP2


def shard_model(model: nn.Module, cfg: Config, accelerator: Any) -> nn.Module:
    """Apply FSDP2 in place: one unit per decoder layer, and the causal LM as the root unit that
    holds the embeddings, the final norm and the head (tied weights must share one unit).

    Trained tensors are float32 masters (FSDP2 needs one dtype among a unit's trained tensors);
    under bf16 they are gathered in bf16 for compute and gradients are reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from cpt.speed import decoder_layers

    t = cfg.train
    device_type = accelerator.device.type
    if t.fsdp_offload_params and device_type != "cuda":
        raise ConfigError("train.fsdp_offload_params moves parameter shards from the GPU to host memory; "
                          "on a CPU run they are in host memory already: set it to false")
    mesh = init_device_mesh(device_type, (int(accelerator.num_processes),))
    mp = accelerator.mixed_precision
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp == "bf16" \
        else MixedPrecisionPolicy()
    kw = dict(mesh=mesh, mp_policy=mp_policy,
              offload_policy=CPUOffloadPolicy(pin_memory=True) if t.fsdp_offload_params else OffloadPolicy())
    causal_lm = _causal_lm(model)
    for layer in decoder_layers(causal_lm):
        fully_shard(layer, reshard_after_forward=t.fsdp_reshard_after_forward, **kw)
    # peft keeps the frozen originals of trained embed_tokens / lm_head beside the trained copies and
    # calls them only while adapters are disabled. In a unit of their own (one unit for both: in a
    # tied model they share a tensor) they stay sharded, instead of being gathered with the root
    # every step for nothing (2 GiB for an 8B model).
    originals = [m.original_module for m in causal_lm.modules()
                 if hasattr(m, "modules_to_save") and isinstance(getattr(m, "original_module", None), nn.Module)]
    if originals:
        fully_shard(originals, reshard_after_forward=True, **kw)
    # The root's parameters are needed again right at the start of backward (the head): keeping them
    # gathered saves an all-gather that nothing could overlap.
    fully_shard(causal_lm, reshard_after_forward=False, **kw)
    # transformers' generate() then keeps every rank stepping until all have finished (synced_gpus):
    # a rank that stopped early would leave the others waiting in an all-gather.
    causal_lm._is_fsdp_managed_module = True
    log.info("fsdp: %d decoder layers and the root sharded over %d processes%s", len(decoder_layers(causal_lm)),
             accelerator.num_processes, ", parameters offloaded to host memory" if t.fsdp_offload_params else "")
    return model
