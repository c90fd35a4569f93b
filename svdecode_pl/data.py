"""Compatibility: ``svdecode_pl.data.*`` class paths now live in :mod:`svdecode_pl.tasks`."""

from svdecode_pl._compat import forwarder

__getattr__ = forwarder(__name__, {
    "TaskDataModule": "svdecode_pl.tasks.base",
    "TruthfulQADataModule": "svdecode_pl.tasks.truthfulqa_mc",
    "TruthfulQAGenerationDataModule": "svdecode_pl.tasks.truthfulqa_gen",
    "CommonsenseDataModule": "svdecode_pl.tasks.commonsense",
    "PromptCompletionDataModule": "svdecode_pl.tasks.completion",
    "DataFormatError": "svdecode_pl.utils.errors",
    "MCQuestion": "svdecode_pl.corpus.questions",
})
