"""The names params.yaml may use that the code also acts on: which metrics exist, which
poolings, profiles, sources. cxr.settings builds its table's choices from them; unlike that
table, this module can change results, so every stage that reads params lists it in dvc.yaml."""

SOURCES = ("kaggle", "archive", "synthetic")
BALANCE = ("undersample", "none")
SCHEDULES = ("constant", "cosine")
PRUNERS = ("median", "hyperband", "none")
# The headline test metrics (compare.metric's choices; cxr.metrics names them for reports).
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro")
# The lung audit's scores with only the lungs visible (cxr.evaluate): compare.metric may
# pick the champion by one of them instead.
LUNG_METRICS = ("lungs_only_macro_f1", "lungs_only_accuracy")
LUNG_FOCUS = ("none", "template")
SHORTCUTS = ("none", "marker")
POOLINGS = ("max", "avg", "flatten")  # the names of cxr.models.POOLINGS' layers
# Profiles: dotted-key overrides that `cxr demo` / `cxr profile NAME` pass to
# `dvc exp run --temp -S`, leaving params.yaml as it is.
PROFILES = ("demo", "real_cpu")
