"""The typed config schema: one dataclass tree, composed by Hydra from `mmfm/configs/`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class VisionConfig:
    kind: str = "vit"  # the vision family (mmfm.models.spec.VISION)
    image_size: int = 32
    patch_size: int = 4
    num_channels: int = 3
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    stem: str = "patch"  # kind=vit: patch or conv (the others patchify)
    # kind=vit: how the learned position embeddings start: normal (drawn at the init std) or sincos (MAE's 2D
    # sine-cosine table, then learned), which tells places apart from the first step.
    position_init: str = "normal"
    # The MLP's width; 0: hidden_size * mlp_ratio (SigLIP-so400m's 4304 is no round ratio of its 1152).
    intermediate_size: int = 0
    # The MLP's activation: gelu (erf), gelu_tanh or quick_gelu; "": the kind's own (vit gelu, siglip
    # gelu_tanh, clip quick_gelu).
    act: str = ""
    # Which layer's output the tower returns, indexed as transformers' hidden_states (1..num_layers, or
    # negative from the end; 0, the embeddings, is refused): LLaVA takes -2. Later layers are not built.
    # kind=vit: -1 only (it returns its last layer, normed).
    feature_layer: int = -1


@dataclass
class ProjectorConfig:
    kind: str = "mlp2x_gelu"  # mmfm.models.spec.PROJECTORS


@dataclass
class MoEConfig:
    """A mixture of experts in place of the dense SwiGLU (mmfm.models.moe; docs/moe.md). num_experts 0: dense."""
    num_experts: int = 0
    top_k: int = 2  # experts per token
    expert_intermediate_size: int = 0  # each expert's SwiGLU width; 0: language.intermediate_size
    num_shared_experts: int = 0  # experts every token goes through (one SwiGLU this many experts wide)
    score_func: str = "softmax"  # softmax | sigmoid (DeepSeek-V3)
    normalize_weights: bool = True  # the top-k weights divided by their sum (Mixtral, Qwen3-MoE, DeepSeek-V3)
    route_scale: float = 1.0  # the combine weights multiplied by this (DeepSeek-V3: 2.5)
    num_groups: int = 1  # group-limited routing: experts in this many groups, each token choosing among the
    topk_groups: int = 1  # ... best topk_groups of them
    aux_loss_coef: float = 0.01  # the load-balancing loss E * sum_e f_e P_e, times this; 0: off
    z_loss_coef: float = 0.0  # the router z-loss, times this
    bias_update_rate: float = 0.0  # DeepSeek-V3's auxiliary-loss-free balancing bias step (e.g. 1e-3); 0: off
    capacity_factor: float = 0.0  # 0: dropless; else each expert takes ceil(factor * tokens * top_k / E) tokens
    first_dense_layers: int = 0  # the first layers keep a dense SwiGLU (DeepSeek-V3: 3)
    every: int = 1  # after them, every n-th layer is a mixture of experts


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3; mmfm.models.llama.mla; docs/models.md) in place of grouped-query
    attention. kv_lora_rank 0: grouped-query attention. Keys and values come from one shared latent of
    kv_lora_rank (queries from one of q_lora_rank; 0: projected directly); each head's query and key are a part
    without rotary embeddings (qk_nope_head_dim) and a rotated part (qk_rope_head_dim), that of the keys one
    vector shared by all heads."""
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128


@dataclass
class LanguageConfig:
    kind: str = "llama"  # the language family (mmfm.models.spec.LANGUAGE)
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # Each head's width; 0: hidden_size / num_heads (Qwen3 sets it apart from the width).
    head_dim: int = 0
    qkv_bias: bool = False  # biases on the q, k and v projections (kind qwen2)
    qk_norm: bool = False  # RMSNorm over each head's q and k before the rotary embedding (kind qwen3)
    # Rotary frequencies: none, or llama3 (Llama 3.1's long-context rescaling, by the four rope_* fields below).
    rope_scaling: str = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    moe: MoEConfig = field(default_factory=MoEConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)


@dataclass
class PretrainedConfig:
    """Hugging Face folders (config.json + safetensors) whose weights replace the seeded initialization: the whole
    VLM from a LlavaForConditionalGeneration folder (vlm), or parts from their own folders (vision: a CLIP /
    SigLIP model; language: a *ForCausalLM), the projector then staying freshly initialized. A checkpoint resume
    or stage.init_from loads over them. "": none."""
    vlm: str = ""
    vision: str = ""
    language: str = ""


def _lora_targets() -> list[str]:
    return ["language.layers.*.attention.w[qkvo]", "language.layers.*.feed_forward.w[123]"]


@dataclass
class LoRAConfig:
    """Low-rank adapters (mmfm.models.lora): each targeted nn.Linear computes W x + (alpha / rank) B A dropout(x),
    its base weight frozen, only A and B trained. targets: fnmatch patterns over the model's module names (e.g.
    language.layers.*.attention.w[qkvo]; projector.*, vision.blocks.*.attn.qkv)."""
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=_lora_targets)
    rslora: bool = False  # scale alpha / sqrt(rank) (rank-stabilized LoRA) instead of alpha / rank
    # The adapted linears' frozen base weights: fp32, or bf16 (half their memory; computed in the input's dtype,
    # so bf16 under train.precision=bf16). Embeddings, norms and linears without an adapter keep fp32.
    base_dtype: str = "fp32"


@dataclass
class ActionHeadConfig:
    """A continuous action head on the language model's hidden states (stage.vla.action=flow; docs/embodied.md):
    kind none | flow (a chunk of `horizon` actions of `dims` numbers by flow matching, as pi0), `layers` blocks of
    attention to the prompt's hidden states and a residual MLP, `width` wide (0: the language model's hidden size)."""
    kind: str = "none"
    horizon: int = 0
    dims: int = 0
    width: int = 0
    layers: int = 3


@dataclass
class ModelConfig:
    name: str = "vlm"  # the model that composes the parts (mmfm.models.spec.MODEL_REGISTRY)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    image_token_id: int = 3
    init_std: float = 0.02
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    action_head: ActionHeadConfig = field(default_factory=ActionHeadConfig)


@dataclass
class MixSource:
    path: str = ""
    weight: float = 1.0


@dataclass
class ChatConfig:
    """The chat template of conversation stages (mmfm.data.chat.ChatTemplate): `markers` (the strings below),
    `tokenizer` (a pretrained tokenizer's own chat template) or `auto` (the tokenizer's for a pretrained
    tokenizer, else the markers)."""
    template: str = "auto"
    system: str = "system: "
    user: str = "user: "
    assistant: str = "assistant: "
    turn_end: str = "\n"
    image_placeholder: str = "<image>"


@dataclass
class ImageConfig:
    """How the loader turns an image into model.vision.image_size pixels (mmfm.data.processor). The defaults
    stretch to a square with bicubic and scale to [-1, 1]."""
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per RGB channel, on the [0, 1] scale
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    resample: str = "bicubic"  # bicubic | bilinear | nearest | lanczos
    # stretch: to image_size x image_size; shortest_edge: the shorter side to image_size (aspect kept), then the
    # centre image_size x image_size crop (CLIPImageProcessor)
    resize: str = "stretch"
    # LLaVA-1.5's expand2square: pad the shorter side to a square with the colour of `mean` before resizing.
    pad_to_square: bool = False
    # A Hugging Face folder whose preprocessor_config.json (CLIP / SigLIP image processor) replaces mean, std,
    # resample and resize, e.g. ${model.pretrained.vision}; "": the fields above.
    processor: str = ""


@dataclass
class DataConfig:
    path: str = "data/synth"
    prompt: str = "describe the image."
    seq_len: int = 128
    batch_size: int = 32  # rows per data-parallel rank and micro-step (packed rows when pack=true)
    shuffle_buffer: int = 1000
    val_batch_size: int = 64
    # Loader processes that decode and tokenize (0: in the training process); same samples and order.
    num_workers: int = 0
    # Pack several samples into each seq_len row (documents never attend to each other).
    pack: bool = False
    # Other data sets mixed into the training stream: data.path has weight data.weight, each entry its own
    # (same tokenizer); validation stays on data.path.
    weight: float = 1.0
    mix: list[MixSource] = field(default_factory=list)
    chat: ChatConfig = field(default_factory=ChatConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    # Check each shard against the manifest's sha256 when a process first opens it (once per shard and process).
    verify_shards: bool = True
    # Spans the epoch's shuffled shards are cut into, shuffled apart and taken in turn (docs/data.md, "Which rank
    # reads what"): a data-parallel rank reads only its own spans' shards when the data-parallel size divides
    # it. 0: the data-parallel size. The sample order depends on it, not on the layout; a resume keeps the
    # checkpoint's.
    partitions: int = 0
    # A file every loader process appends each sample it reads to (shard, sample, bytes; one JSON line each).
    read_log: str = ""
    # Where data.path's shards are read from instead of its folder (manifest and tokenizer stay there): a template
    # whose {shard} is a manifest shard name, e.g. s3://bucket/caps/{shard} (fsspec; the scheme's package
    # installed) or "pipe:aws s3 cp s3://bucket/caps/{shard} -". Taken from the config only, never from a file.
    shards_url: str = ""


@dataclass
class VlaConfig:
    """stage=vla: a vision-language-action policy on robot data (a lerobot source's shards; docs/embodied.md). action:
    tokens (each normalized action dimension one of `bins` tokens, the vocabulary's last ids) or flow (the model's
    action head, model.action_head, trained by flow matching; flow_steps: its Euler steps when acting); horizon: the
    actions predicted per step (at most the data's); state: the proprioceptive state as tokens in the prompt (in
    `bins` bins either way); pad_loss, bin_init, label_sigma: how the bins are learned (docs/embodied.md)."""
    action: str = "tokens"
    bins: int = 64
    horizon: int = 4
    state: bool = True
    pad_loss: bool = True  # the chunk's padding (the final action repeated past the episode's end) carries loss
    bin_init: str = "ordinal"  # ordinal: the bins' embeddings start as smooth functions of the bin | keep
    label_sigma: float = 0.0  # > 0: Gaussian soft targets over neighbouring bins (std in bins), as HL-Gauss
    flow_steps: int = 10


@dataclass
class PreferenceConfig:
    """stage.objective=dpo: which preference loss (mmfm.train.alignment_losses) and its hyper-parameters."""
    loss: str = "dpo"  # dpo | cdpo | ipo | simpo | orpo
    beta: float = 0.1  # DPO/cDPO/IPO: KL strength; SimPO: reward scale (the paper uses ~2); ORPO: unused
    label_smoothing: float = 0.1  # cDPO: assumed label-flip probability
    gamma: float = 0.5  # SimPO: target reward margin
    orpo_lambda: float = 0.1  # ORPO: weight of the odds-ratio term
    ipo_length_normalized: bool = True  # IPO on per-token log-ratios (as TRL)
    # Reference log-probs: "model" (a frozen copy of stage.init_from, sharded like the policy) or "precomputed"
    # (stored with the data as "reference_logps" by `mmfm data reference-logps`). SimPO and ORPO use none.
    reference: str = "model"


@dataclass
class GrpoConfig:
    """stage.objective=grpo: online sampling with a rule-based reward."""
    group_size: int = 4  # answers sampled per prompt (data.batch_size prompts per micro-step)
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    temperature: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 8
    reward: str = "exact_answer"  # mmfm.train.rewards


@dataclass
class StageConfig:
    """What a stage optimizes: pretrain (captions), sft (assistant turns of conversations), dpo (a preference
    loss over answer pairs), grpo (sampled answers scored by a reward) or vla (robot actions). Same loop, layouts and checkpoints."""
    objective: str = "pretrain"
    # Weights to start from when the run directory has no checkpoint yet: an earlier stage's run directory or
    # one of its checkpoints/step_* folders (model weights only: a fresh optimizer, step 0, fresh data).
    init_from: str = ""
    # Top-level model parts left untouched: any of vision, projector, language (e.g. [vision, language]:
    # train only the projector, as LLaVA's first stage).
    freeze: list[str] = field(default_factory=list)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    vla: VlaConfig = field(default_factory=VlaConfig)


@dataclass
class ParallelConfig:
    # dp_replicate x dp_shard x cp x tp x pp = the world size. One of dp_shard and dp_replicate may be -1: the rest
    # of the world (world / the other dims), resolved by `mmfm launch` from the cluster and by `mmfm train` from
    # WORLD_SIZE (mmfm.config.world).
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    # Expert parallelism: the experts of each mixture-of-experts layer split over ep ranks carved out of dp_shard
    # (ep divides dp_shard and the expert count); their weights are sharded by FSDP over the dp_shard / ep ranks
    # left (docs/moe.md).
    ep: int = 1
    # Pipeline: the schedule (gpipe | 1f1b | interleaved_1f1b | zero_bubble), stages per rank (>= 2 for
    # the interleaved and zero-bubble schedules), and decoder layers per stage (empty: balanced by cost).
    # Each loader batch is split into pp_microbatches (0: pp of them); a step's pipeline micro-batches are
    # those of its train.grad_accum_steps loader batches.
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 0
    pp_virtual_stages: int = 1
    pp_layers: list[int] = field(default_factory=list)
    # FSDP: keep parameters gathered between forward and backward (more memory, fewer all-gathers).
    reshard_after_forward: bool = True
    # parallel=auto: the dims, pipeline schedule, micro-batch (data.batch_size, train.grad_accum_steps) and
    # activation checkpointing are those `mmfm plan` ranks first for the model, hardware=, the world size and
    # train.global_batch (mmfm.plan.auto, docs/planning.md). `mmfm launch` pins the plan (parallel.auto=false).
    auto: bool = False


@dataclass
class KernelsConfig:
    """Which implementation each fused op runs (mmfm.kernels): `auto` (the Triton kernel on CUDA when
    Triton imports, else the PyTorch reference), `triton`, or `torch` (the model's own PyTorch code).
    linear_cross_entropy also takes `chunked`: the fused, chunked loss with torch ops (any device).
    attention: the decoder's attention core, auto | flash | flex | sdpa (mmfm.kernels.attention).
    experts: a mixture of experts' matmuls, auto | grouped_mm (torch._grouped_mm: one call per projection for all
    experts) | loop (one matmul per expert); auto: grouped_mm where it runs (CPU, CUDA compute capability 9.0+)."""
    rms_norm: str = "auto"
    rotary: str = "auto"
    swiglu: str = "auto"
    linear_cross_entropy: str = "auto"
    attention: str = "auto"
    experts: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    max_steps: int = 500
    grad_accum_steps: int = 1
    # Samples per optimizer step over all data-parallel ranks (`mmfm plan global_batch=`); 0: not fixed, i.e.
    # data.batch_size x grad_accum_steps x dp_replicate x dp_shard. Set, the layout must give exactly this;
    # parallel=auto plans for it.
    global_batch: int = 0
    grad_clip: float = 1.0
    precision: str = "fp32"
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    val_every: int = 100
    val_batches: int = 2
    activation_checkpoint: str = "none"
    activation_checkpoint_every: int = 2
    # torch.compile each transformer block (in place, so parameter names are unchanged), with this backend.
    compile: bool = False
    compile_backend: str = "inductor"


@dataclass
class EvalConfig:
    """num_samples: held-out samples captioned (exact match) at the end of a run. tasks: evaluation tasks
    (mmfm.eval: `synth/...` names or task files) scored every `every` steps (0: at the end only) on the first `limit`
    items of each (0: all), logged as kind "tasks" to metrics.jsonl and wandb (docs/evaluation.md)."""
    num_samples: int = 256
    show_examples: int = 5
    max_new_tokens: int = 32
    tasks: list[str] = field(default_factory=list)
    every: int = 0
    limit: int = 0


@dataclass
class CheckpointConfig:
    every: int = 100
    keep_last: int = 2
    resume: str = "auto"


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"
    project: str = "mmfm"
    entity: Optional[str] = None


@dataclass
class LoggerConfig:
    log_every: int = 10
    progress_bar: bool = True
    cpu_peak_tflops: float = 1.0
    peak_tflops: Optional[float] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ClusterConfig:
    """Where `mmfm launch` runs the job (mmfm.launch, templates in mmfm/launch/templates/): `local` (torchrun on
    this machine) or `slurm` (an sbatch script that starts one torchrun per node)."""
    kind: str = "local"
    job_name: str = "mmfm"
    nodes: int = 1
    # GPUs requested per node (0: a CPU job); one training process per GPU.
    gpus_per_node: int = 0
    # Training processes per node; 0: gpus_per_node, or on CPU nodes the parallel layout's world size / nodes.
    procs_per_node: int = 0
    # CPUs for each node's torchrun and all its ranks (0: Slurm's default; on cluster=local all of this machine's).
    cpus_per_task: int = 0
    mem: str = ""  # sbatch --mem ("0": all of a node's memory; "": the partition's default)
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = ""  # sbatch --time: minutes, HH:MM:SS or D-HH:MM:SS ("": the partition's limit)
    # Slurm signals the batch script this many seconds before the time limit; the ranks checkpoint (0: off).
    signal_lead_s: int = 300
    # After that checkpoint, requeue the job: the new allocation resumes in the same run directory.
    requeue: bool = True
    master_port: int = 29500  # the rendezvous port on the first node
    python: str = ""  # the interpreter on the nodes ("": the one running `mmfm launch`)
    container_image: str = ""  # srun --container-image (pyxis/enroot)
    container_mounts: str = ""  # srun --container-mounts, e.g. /data:/data,/home:/home
    setup: list[str] = field(default_factory=list)  # shell lines run first, e.g. `module load cuda/12.4`
    sbatch_flags: list[str] = field(default_factory=list)  # extra #SBATCH flags, e.g. --exclusive
    srun_flags: list[str] = field(default_factory=list)  # extra srun flags, e.g. --cpu-bind=none
    env: dict[str, str] = field(default_factory=dict)  # exported for every rank, e.g. NCCL_DEBUG: WARN


@dataclass
class FaultsConfig:
    """Keeping long runs alive (mmfm.train.watchdog, mmfm.train.preemption, the loss guard in the trainer)."""
    # A collective that waits longer than this fails (the process group's timeout), seconds.
    collective_timeout_s: float = 600.0
    # A rank that makes no progress for this long dumps every thread's stack to <run_dir>/stacks/ and exits
    # non-zero, ending the job (0: off).
    hang_timeout_s: float = 0.0
    # On SIGUSR1/SIGTERM or a <run_dir>/preempt.request file: checkpoint at the next step and stop, for a requeue.
    preemption: bool = True
    # Skip the update of a step whose loss is NaN/inf or above spike_factor x the mean of the last spike_window
    # good steps (0: spikes off); stop after max_bad_steps consecutive bad steps.
    spike_factor: float = 0.0
    spike_window: int = 20
    max_bad_steps: int = 3


@dataclass
class HardwareConfig:
    """One accelerator and its node, for `mmfm plan` (mmfm.plan) only: nothing in training reads it. Presets in
    mmfm/configs/hardware/ (hardware=h100 | h200 | a100_80gb | ascend_910b) cite their public spec figures."""
    name: str = "h100"
    peak_bf16_flops: float = 989.4e12  # dense (no sparsity), FLOP/s
    peak_fp8_flops: float = 1978.9e12  # dense; 0: the device has no fp8 tensor cores
    hbm_bytes: int = 80 * 2**30  # device memory
    hbm_bandwidth: float = 3.35e12  # bytes/s
    devices_per_node: int = 8
    intra_node_bandwidth: float = 450e9  # bytes/s per device and direction (NVLink, HCCS)
    inter_node_bandwidth: float = 50e9  # bytes/s per device and direction (e.g. one 400 Gb/s InfiniBand port)
    # Fraction of the peak that training's matmuls reach (model FLOPs); replace by a measured figure.
    achievable: float = 0.5


@dataclass
class DeepSpeedConfig:
    """engine.name=deepspeed (docs/engines.md). zero_stage and the offloads: null takes the JSON's value (config),
    else stage 2 without offload. offload_optimizer: none | cpu | nvme; offload_param (ZeRO-3): none | cpu | nvme;
    nvme_path: the folder nvme offload swaps to. config: a DeepSpeed JSON merged in (its other ZeRO and communication
    settings kept); a key that mmfm's config also sets (batch sizes, clipping, precision, optimizer) must agree.
    cpu_adam: offloaded optimizer state stepped by DeepSpeed's CPUAdam (a C++ op built on first use) instead of
    torch's AdamW."""
    zero_stage: Optional[int] = None
    offload_optimizer: Optional[str] = None
    offload_param: Optional[str] = None
    nvme_path: str = ""
    config: str = ""
    cpu_adam: bool = False


@dataclass
class EngineConfig:
    """What runs the model's steps: native (FSDP2/HSDP, tp, pp, cp, ep) or deepspeed (ZeRO-1/2/3 with offload,
    data parallel only); the same model, data, objectives, metrics, fault handling and checkpoints either way."""
    name: str = "native"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)  # `mmfm plan` only
    experiment_name: str = "default"
    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"
