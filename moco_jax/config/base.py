"""The base configuration every recipe in configs/ derives from.

Section and key names are a user-facing contract (see README): `model`,
`moco`, `data`, `optim`, `train`, `eval`, `seed`, `dtype`.
"""
import ml_collections


def train_section(num_epochs: int, keep_checkpoints: int) -> ml_collections.ConfigDict:
  """The `train` section, shared by pretraining and linear evaluation."""
  train = ml_collections.ConfigDict()
  train.batch_size = 256           # global, over all devices and hosts
  train.num_epochs = num_epochs
  train.num_steps = -1             # > 0 overrides num_epochs
  train.log_every = 100
  train.checkpoint_every = 1000
  train.keep_checkpoints = keep_checkpoints
  return train


def base_config() -> ml_collections.ConfigDict:
  """MoCo v2, ResNet-50, ImageNet at 224 (arXiv:2003.04297)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = 'float32'              # compute dtype: 'float32' or 'bfloat16'
  c.init_from = ''                 # optional weights to start f_q and f_k from

  c.model = ml_collections.ConfigDict()
  c.model.arch = 'resnet50'        # resnet18, resnet34, resnet50, resnet101, resnet152
  c.model.width_multiplier = 1.0   # 2, 4 for R50w2/w4; 0.25 for narrow CPU nets
  c.model.cifar_stem = False       # 3×3 stride-1 first conv, no max-pool
  c.model.head = 'mlp'             # 'linear' (v1) or 'mlp' (v2)
  c.model.head_hidden_dim = 0      # 0: the backbone's feature width (2048 for R50)
  c.model.dim = 128
  c.model.conv_impl = 'auto'       # 'auto' (fast backward on CPU), 'xla', 'fast'

  c.moco = ml_collections.ConfigDict()
  c.moco.queue_size = 65536        # K, a multiple of the global batch
  c.moco.momentum = 0.999
  c.moco.temperature = 0.2
  c.moco.shuffle_bn = True
  c.moco.bn_splits = 1             # BN groups per device (8 on one device = 8 GPUs)

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'imagenet2012'  # a TFDS name, or folder:/path (a subfolder per class)
  c.data.data_dir = ''             # '' = TFDS's default (TFDS_DATA_DIR)
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.image_size = 224
  c.data.crop_scale = (0.2, 1.0)   # RandomResizedCrop area fraction
  c.data.augment = 'v2'            # v1, v2, v3, cifar, none (colour part, on device)
  c.data.normalization = 'imagenet'  # mean/std: 'imagenet' or 'cifar10'
  c.data.shuffle_buffer = 50_000
  c.data.cache = False             # keep encoded images in memory (small sets)
  # Decode a JPEG only inside each crop window (decode_and_crop_jpeg) instead of
  # once per image: slower for two views (BENCHMARKS.md), so off by default.
  c.data.fused_jpeg_crop = False

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'             # sgd, lars, adamw
  c.optim.base_lr = 0.03           # per 256 images; scaled by the global batch
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'cosine'      # cosine, step, constant
  c.optim.lr_drop_epochs = (120, 160)  # for 'step': ×0.1 at each
  c.optim.warmup_epochs = 0.0

  c.train = train_section(num_epochs=200, keep_checkpoints=3)

  c.eval = ml_collections.ConfigDict()
  c.eval.knn_every = 0.0           # epochs between kNN evaluations; 0 = never
  c.eval.knn_at_start = False      # also evaluate the random init at step 0
  c.eval.batch_size = 512          # feature-extraction batch (global)
  c.eval.knn_k = 200
  c.eval.knn_t = 0.1
  return c
