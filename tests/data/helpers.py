"""Shared by the data tests: a small synthetic benchmark and readers of a split's rows."""

from gating import data

SMALL = dict(num_tasks=4, input_len=8, num_digits=6, num_recall_tasks=2,
             num_induction_tasks=3, num_train=600, num_validation=60, num_test=90)


def columns(dataset):
  """Every row of a split, in order, as numpy arrays in the stored dtypes."""
  return next(data.eval_batches(dataset, len(dataset)))


def rows_of(dataset):
  return {row.tobytes() for row in columns(dataset)['tokens']}
