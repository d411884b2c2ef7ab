"""Shared pieces of the config files (configs/*.py are the configs themselves)."""
import os

# Environment variable naming the folder of the shared data sets (sst2/, germeval2014/,
# multi30k/): configs/encoder.py and configs/mt.py read it.
SHARED_DATA_ENV = 'TRANSFORMER_JAX_SHARED_DATA'
# The shared data folder beside the checkout (or the installed package's parent folder).
BESIDE_CHECKOUT = os.path.normpath(os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data'))


def shared_data_root() -> str:
  """The folder of the shared data sets: $TRANSFORMER_JAX_SHARED_DATA, else
  BESIDE_CHECKOUT (which may not exist)."""
  return os.environ.get(SHARED_DATA_ENV) or BESIDE_CHECKOUT


def add_peft_fields(c) -> None:
  """Sets the parameter-efficient fine-tuning fields of config `c` to their defaults
  (no PEFT). A PEFT run trains only an adapter beside the frozen base model named by
  `config.init_from`; see transformer_jax/peft/ and the README's PEFT section."""
  # '' (train every parameter), 'lora', 'adapter', 'prefix', 'prompt' or 'ia3'.
  c.peft_method = ''
  # Base parameters trained in full beside the adapter (regexes over
  # '/'-joined names); the classification and tagging heads are new, so trained.
  c.peft_modules_to_save = (r'head/.*',)
  # Rows of the token table trained in full beside any method (transformer_jax/peft/
  # token_rows.py): these ids, plus every piece that occurs in the text files
  # peft_token_rows_from (a new language) and in none of peft_token_rows_except (the
  # text the base was trained on).
  c.peft_token_rows = ()
  c.peft_token_rows_from = ()
  c.peft_token_rows_except = ()
  c.lora_rank = 8             # LoRA rank r (Hu et al. 2021).
  c.lora_alpha = 16.0         # The update is scaled by lora_alpha / lora_rank.
  c.lora_dropout = 0.0        # Dropout on the LoRA branch's input.
  # Layers that get LoRA: regexes fullmatching a module path
  # ('decoder/layers_0/cross_attention/query') or its last name; 'embed' is the token
  # table (a new language's embeddings with the rest frozen).
  c.lora_targets = ('query', 'value')
  c.adapter_size = 64         # Bottleneck width of the adapters (Houlsby et al. 2019).
  c.prefix_length = 16        # Prefix positions per attention (Li & Liang 2021).
  c.prefix_mlp_hidden = 0     # > 0: prefixes from an MLP of this width (section 4.3).
  c.prompt_length = 20        # Soft-prompt length on the encoder input (Lester et al. 2021).


def add_parallelism_fields(c) -> None:
  """Sets the fields that say how a run is spread over devices and processes (defaults:
  data parallelism over every device, one process). Any of them may change on resume: a
  checkpoint restores onto another mesh. See transformer_jax/sharding.py and the README's
  "Scale out" section."""
  # Devices along the mesh axes (data, fsdp, tensor); one -1 means "the rest". Batches
  # split over data x fsdp; parameters and optimizer state over fsdp and tensor, as
  # `logical_axis_rules` says.
  c.mesh_shape = (-1, 1, 1)
  # (logical axis, mesh axis or None) pairs, in order of precedence (Flax
  # `nn.logical_axis_rules`): the first rule whose mesh axis is still free in an array
  # wins. Logical axes: batch, length, embed, heads, kv, mlp, vocab.
  c.logical_axis_rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('mlp', 'tensor'),
      ('vocab', 'tensor'),
  )
  # Micro-batches per optimizer update: the update equals one step on their concatenation,
  # with one gradient buffer; the learning-rate schedule counts updates.
  c.grad_accum_steps = 1
  # Multi-process runs (jax.distributed): '' = one process, unless the launcher's
  # environment says otherwise (Cloud TPU, SLURM, JAX_COORDINATOR_ADDRESS, ...).
  c.coordinator_address = ''  # 'host:port' of process 0.
  c.num_processes = 0         # 0 = from the environment.
  c.process_id = -1           # -1 = from the environment.


def add_tracking_fields(c) -> None:
  """Sets the experiment-tracking fields of config `c` to their defaults (TensorBoard
  only). With `wandb_project` set, the trainer logs the same scalars to a Weights & Biases
  run too, with the config and the final report (transformer_jax/tracking.py; needs
  `pip install 'transformer_jax[wandb]'`). Any of them may change on resume."""
  # W&B project the run logs to beside TensorBoard; '' = no W&B. Offline (no network):
  # WANDB_MODE=offline, then `wandb sync WORKDIR/wandb/offline-run-*`.
  c.wandb_project = ''
  c.wandb_entity = ''         # W&B user or team; '' = the default of your login.
  c.wandb_run_name = ''       # The run's name; '' = the workdir's name.


def add_regularizer_fields(c) -> None:
  """Sets the regularizer fields of config `c` to their defaults (all off). They compose
  with any task's loss (transformer_jax/regularizers.py); none may change on resume."""
  # Adversarial training on the token embeddings: '' (off), 'fgm' (Miyato et al. 2017:
  # loss at the embeddings + loss at one normalized gradient step of norm epsilon),
  # 'pgd' (Madry et al. 2018: the same with `adversarial_steps` projected steps) or
  # 'freelb' (Zhu et al. 2020: the mean loss over `adversarial_steps` ascent steps).
  c.adversarial = ''
  # Radius of each example's perturbation (L2 over [L, D], in units of the token table).
  # FGM on configs/multi30k_de_en.py, validation BLEU at step 1,400: 37.39 with 0.1, 19.82
  # with 1.0 (docs/benchmarks.md, 2026-12-02).
  c.adversarial_epsilon = 0.1
  c.adversarial_steps = 3         # pgd, freelb: ascent steps K (each a forward + backward).
  c.adversarial_step_size = 0.05  # pgd, freelb: ascent step alpha (half the default epsilon).
  # R-Drop (Liang et al. 2021): > 0 runs each row twice (two dropout masks) and adds
  # r_drop_alpha x the symmetric KL between the two predictions; 0 = off.
  c.r_drop_alpha = 0.0
  # Exponential moving average of the parameters (debiased, as optax.ema), used for
  # evaluation, the best checkpoint, the test and eval/predict/export; 0 = off.
  c.ema_decay = 0.0
