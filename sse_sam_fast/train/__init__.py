"""The training application behind ``sse-sam-fast train`` and ``compare``.

The optimizers never import it; importing it imports none of its modules, so
that ``verify`` and ``bench`` can take :mod:`.models` without the loop, tqdm,
scikit-learn or matplotlib.

``registry``    the names each option accepts: methods, models, data sets, losses
``config``      :class:`~.config.TrainConfig`, per-data-set defaults, checks, ``OptionError``
``data``        long-tailed data sets (digits, a Gaussian mixture, CIFAR-LT)
``models``      MLP, CIFAR ResNet-32 / -34, a small ViT
``losses``      per-sample long-tail losses (CE, LDAM-DRW, logit adjustment, VS)
``metrics``     per-class, Many / Medium / Few and head / tail accuracy
``checkpoint``  ``checkpoint.pt``, RNG states, atomic writes, resume
``loop``        :func:`~.loop.train`: one run, epoch by epoch
``compare``     :func:`~.compare.compare`: methods x seeds, mean ± std
``report``      tables and plots (Agg figures, no global matplotlib backend)
"""
