import default
def get_config(arg=None):
  c = default.get_config(arg)
  c.data.shape = (64, 64, 32)
  c.data.spacing = ()
  c.text.model_path = "minilm"
  c.text.max_tokens = 100
  c.model.resnet.layers = (1, 1, 1, 1)
  c.model.resnet.widths = (16, 32, 64, 128)
  c.model.resnet.conv1_kernel = 3
  c.model.resnet.conv1_stride = 2
  c.model.embed_dim = 128
  c.model.fusion.num_heads = 4
  c.train.batch_size_per_device = 16
  c.eval.batch_size_per_device = 16
  c.train.epochs = 10
  c.train.lr = 1e-3
  c.train.warmup_steps = 20
  c.train.log_every_steps = 5
  c.eval.bootstrap_samples = 0
  return c
