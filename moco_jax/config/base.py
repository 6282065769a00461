"""The base configuration every recipe in configs/ derives from.

Section and key names are a user-facing contract (see docs/pretraining.md): `model`,
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
  c.model.arch = 'resnet50'        # resnet18, resnet34, resnet50, resnet101, resnet152, vit_*
  c.model.width_multiplier = 1.0   # 2, 4 for R50w2/w4; 0.25 for narrow CPU nets
  c.model.cifar_stem = False       # 3×3 stride-1 first conv, no max-pool
  c.model.head = 'mlp'             # 'linear' (v1), 'mlp' (v2), 'v3' (MLP with SyncBN)
  c.model.head_hidden_dim = 0      # 0: the backbone's feature width (2048 for R50); 4096 for v3
  c.model.predictor = False        # v3: predictor MLP on the query branch (head='v3')
  c.model.stop_grad_conv1 = False  # v3 ViT: frozen random patch projection
  c.model.dim = 128
  c.model.conv_impl = 'auto'       # 'auto' (fast backward on CPU), 'xla', 'fast'

  c.moco = ml_collections.ConfigDict()
  c.moco.queue_size = 65536        # K, a multiple of the global batch
  c.moco.momentum = 0.999          # m, or m₀ of the cosine schedule
  c.moco.momentum_schedule = 'constant'  # 'cosine' (v3): m₀ -> 1 over the run
  c.moco.temperature = 0.2
  c.moco.shuffle_bn = True
  # How shuffle BN crosses devices: 'statistics' (each BN layer sums its
  # shuffled groups' statistics over devices: G × C numbers) or 'images'
  # (the reference's all_gather of the key images; kept for one release).
  c.moco.shuffle_bn_mode = 'statistics'
  # BN groups in the GLOBAL batch, whatever the device count: the reference's 8
  # GPUs (or SplitBN 8). Each device normalises bn_groups / devices groups.
  c.moco.bn_groups = 8
  c.moco.symmetric = False         # loss L(q1,k2) + L(q2,k1), 2B keys enqueued

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'imagenet2012'  # a TFDS name, or folder:/path (a subfolder per class)
  c.data.data_dir = ''             # '' = TFDS's default (TFDS_DATA_DIR)
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.image_size = 224
  c.data.crop_scale = (0.2, 1.0)   # RandomResizedCrop area fraction
  c.data.augment = 'v2'            # v1, v2, v3, cifar, none (colour part, on device)
  c.data.normalization = 'imagenet'  # mean/std: 'imagenet' or 'cifar10'
  c.data.cache = False             # keep encoded images in memory (small sets)
  # Decode a JPEG only inside each crop window (decode_and_crop_jpeg) instead of
  # once per image: slower for two views (BENCHMARKS.md), so off by default.
  c.data.fused_jpeg_crop = False
  # The split on the devices as uint8, cropped and flipped in the step (no host
  # pipeline): True, False, or 'auto' (when all images share one size and the
  # splits fit in on_device_max_fraction of a device's memory). npz: datasets
  # need it.
  c.data.on_device = ml_collections.FieldReference(False, field_type=object)
  c.data.on_device_max_fraction = 0.25
  # Host input: 'tf.data', 'grain' (random access: exact shuffle and resume at
  # any size; a TFDS split in array_record, or folder:), or 'auto' (Grain for
  # an array_record split). Same batches either way (docs/input.md).
  c.data.loader = 'auto'
  # Grain's decode-and-crop processes: 'auto' (host cores - 1) or an int (0:
  # threads of the training process).
  c.data.worker_count = ml_collections.FieldReference('auto', field_type=object)

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'             # sgd, lars, adamw
  c.optim.base_lr = 0.03           # per 256 images; scaled by the global batch
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'cosine'      # cosine, step, constant
  c.optim.lr_drop_epochs = (120, 160)  # for 'step': ×0.1 at each
  c.optim.warmup_epochs = 0.0

  c.train = train_section(num_epochs=200, keep_checkpoints=3)
  # Stop with exit 3 (nothing saved after the last checkpoint) once the
  # collapse warning fires (evaluation/collapse.py); by default only warn.
  c.train.stop_on_collapse = False

  c.eval = ml_collections.ConfigDict()
  c.eval.knn_every = 0.0           # epochs between kNN evaluations; 0 = never
  c.eval.knn_at_start = False      # also evaluate the random init at step 0
  c.eval.batch_size = 512          # feature-extraction batch (global)
  c.eval.knn_k = 200
  c.eval.knn_t = 0.1
  # kNN feature: 'backbone' (pooled, e.g. 2048-d) or 'head' (the query
  # encoder's L2-normalised projection, as the reference CIFAR demo).
  c.eval.knn_features = 'backbone'
  # Few-shot linear evaluation (evaluation/fewshot.py): closed-form ridge on
  # k images per class of data.train_split, top-1 on data.eval_split.
  c.eval.fewshot_every = 0.0       # epochs between evaluations; 0 = never
  c.eval.fewshot_shots = (1, 5, 10, 25)
  c.eval.fewshot_seeds = 3         # draws of the k-shot images: mean and std
  c.eval.fewshot_l2_reg = 1.0      # ridge penalty on the unit-norm features
  return c
