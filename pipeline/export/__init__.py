"""The export sink (not a stage): the run's ``tables/samples`` -> WebDataset training shards, the
export manifest and a Hugging Face dataset card.

What is exported is a *view*: every stage's status must be ok, and each stage's own keep decision
applies unless the export names thresholds for that stage, which then replace it. Changing a
threshold re-runs only the export, never a model stage. Splits are by identity.

- ``config``: the export config (``export.where`` is checked by ``manifests.sql.predicate_sql``);
- ``plan``: the selection per partition, the per-identity table, splits, labels, shard assignment;
- ``shards``: writer tasks (grouped byte ranges of the source tars -> training tars);
- ``card``: the dataset card; ``task``: orchestration and the commit (write beside, then switch).
"""

from pipeline.export.config import ExportConfig, Threshold

__all__ = ["ExportConfig", "Threshold"]
