"""The base configuration of end-to-end fine-tuning (configs/finetune_*.py derive
from it); the command line is moco_jax/finetune.py.

A pretrained backbone plus a new linear classifier are trained together on a
labelled dataset. Section names follow pretraining's (`model`, `data`,
`optim`, `train`, `eval`) plus `finetune` for what only fine-tuning has.
The defaults are the CIFAR-10 CPU recipe's optimiser (SGD, cosine); the
recipes in configs/ say which published protocol each follows.
"""
import ml_collections

from moco_jax.config.base import train_section

START_POINTS = ('pretrained', 'random')
BN_MODES = ('train', 'frozen')


def finetune_base_config() -> ml_collections.ConfigDict:
  """Fine-tuning of a moco_jax pretraining run on CIFAR-10 at 32x32."""
  c = ml_collections.ConfigDict()
  # A pretraining workdir, a `--format=flax` export (.msgpack), or an official
  # MoCo v1/v2/v3 or torchvision/timm checkpoint (.pth, .pth.tar, .npz, .pkl;
  # these need model.arch).
  c.pretrained = ''
  c.pretrained_step = -1           # a workdir's checkpoint; -1: the newest (kept on resume)
  # 'pretrained': start from those weights; 'random': the same architecture
  # from a random initialisation (the baseline a pretrained start must beat).
  c.init = 'pretrained'
  c.seed = 0
  c.dtype = 'float32'              # compute dtype: 'float32' or 'bfloat16'

  # Only read when the start point does not describe its model (official
  # checkpoints, or no `pretrained` with init='random'); a workdir or Flax
  # export brings its own, and a different model.arch here is an error.
  c.model = ml_collections.ConfigDict()
  c.model.arch = ''                # '' = the start point's
  c.model.width_multiplier = 1.0
  c.model.cifar_stem = False
  c.model.conv_impl = 'auto'       # 'auto' (fast backward on CPU), 'xla', 'fast'

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'cifar10'       # a TFDS name, folder:/path or npz:/file.npz
  c.data.data_dir = ''             # '' = TFDS's default (TFDS_DATA_DIR)
  # TFDS slices select a labelled subset, e.g. 'train[:10%]' (the first 10%,
  # not class-balanced) or imagenet2012_subset/1pct's 'train'.
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.image_size = 32
  # A balanced low-label subset: labels_per_class images of every class of
  # train_split, drawn with labels_seed, the same on every process
  # (data/subset.py); 0 = the whole split.
  c.data.labels_per_class = 0
  c.data.labels_seed = 0
  c.data.crop_scale = (0.08, 1.0)  # RandomResizedCrop's default
  c.data.normalization = ''        # '' = the start point's mean/std
  c.data.cache = True
  c.data.fused_jpeg_crop = False
  # True/'auto': the split on the devices, cropped in the step (config/base.py).
  c.data.on_device = ml_collections.FieldReference('auto', field_type=object)
  c.data.on_device_max_fraction = 0.25

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'             # sgd, lars, adamw
  c.optim.base_lr = 0.1            # per 256 images; scaled by the global batch
  c.optim.momentum = 0.9
  c.optim.nesterov = False         # sgd: Nesterov momentum (the semi-supervised protocol)
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'cosine'      # cosine, step, constant
  c.optim.lr_drop_epochs = (60, 80)
  c.optim.warmup_epochs = 0.0
  # Layer-wise lr decay (BEiT/MAE): layer i of L gets lr x decay^(L - i), the
  # head decay^0; 1.0 = off. Layers: a ResNet's stem, stages, head; a ViT's
  # patch embedding, blocks, head.
  c.optim.layer_decay = 1.0

  c.finetune = ml_collections.ConfigDict()
  c.finetune.num_classes = 0       # 0 = the dataset's; another number is an error
  # Freeze the backbone up to and including this stage: '' (nothing), 'stem',
  # 'layer1'..'layer4' (ResNet), 'patch_embed', 'blocks_N' (ViT), 'all'.
  c.finetune.freeze_to = ''
  c.finetune.bn = 'train'          # 'train': batch statistics; 'frozen': running ones
  c.finetune.head_warmup_epochs = 0.0  # only the head learns for this long
  c.finetune.label_smoothing = 0.0
  c.finetune.mixup_alpha = 0.0     # > 0: mixup with Beta(alpha, alpha)
  c.finetune.cutmix_alpha = 0.0    # > 0: CutMix with Beta(alpha, alpha)
  c.finetune.mix_switch_prob = 0.5  # with both: CutMix for this fraction of batches
  c.finetune.random_erasing = 0.0  # probability per image (timm's 'pixel' mode)
  c.finetune.drop_path = 0.0       # ViT stochastic depth (its last block's rate)

  c.train = train_section(num_epochs=10, keep_checkpoints=2)
  c.train.batch_size = 256

  c.eval = ml_collections.ConfigDict()
  c.eval.every_epochs = 1.0        # top-1/top-5 on data.eval_split; 0 = only at the end
  c.eval.batch_size = 512          # global
  return c


# SimCLR's fine-tuning epochs per labelled fraction (arXiv:2002.05709, App. B.5).
SEMI_SUPERVISED_EPOCHS = {1: 60, 10: 30}


def semi_supervised_r50(percent: int) -> ml_collections.ConfigDict:
  """The semi-supervised protocol on imagenet2012_subset/{1,10}pct: whole
  network + new head, SGD Nesterov momentum 0.9, lr 0.05 per 256 images, no
  warm-up, no weight decay, crop + flip only, 60 (1%) or 30 (10%) epochs
  (SimCLR, arXiv:2002.05709, Appendix B.5; configs/finetune_r50_semisup_*.py)."""
  c = finetune_base_config()
  c.dtype = 'bfloat16'
  c.data.dataset = f'imagenet2012_subset/{percent}pct'
  c.data.eval_split = 'validation'
  c.data.image_size = 224
  c.data.cache = False
  c.data.on_device = False
  c.data.normalization = 'imagenet'
  c.optim.nesterov = True
  c.optim.base_lr = 0.05
  c.optim.weight_decay = 0.0
  c.train.batch_size = 1024
  c.train.num_epochs = SEMI_SUPERVISED_EPOCHS[percent]
  c.train.log_every = 10
  c.train.checkpoint_every = 500
  c.eval.every_epochs = 5
  c.eval.batch_size = 1024
  return c
