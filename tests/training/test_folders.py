import os

import pytest

from gating.study.sweep import SweepError
from gating.training import folders


def test_a_folder_or_a_path_that_can_become_one_passes(tmp_path):
  folders.check_output_folder(str(tmp_path), 'workdir')                 # exists
  folders.check_output_folder(str(tmp_path / 'a' / 'b'), 'workdir')     # can be made
  assert os.listdir(tmp_path) == []                                     # makes nothing


def test_a_file_a_path_under_a_file_and_a_broken_link_are_refused(tmp_path):
  file = tmp_path / 'notes.txt'
  file.write_text('mine')
  with pytest.raises(ValueError, match=f'^workdir {file}: exists and is not a folder$'):
    folders.check_output_folder(str(file), 'workdir')
  with pytest.raises(ValueError, match=f'^--out {file}/run: {file} is a file, so '):
    folders.check_output_folder(str(file / 'run'), '--out')
  link = tmp_path / 'link'
  link.symlink_to(tmp_path / 'gone')
  with pytest.raises(SweepError, match='link: exists and is not a folder'):
    folders.check_output_folder(str(link), '--out', SweepError)
  assert file.read_text() == 'mine' and sorted(os.listdir(tmp_path)) == ['link', 'notes.txt']


def test_a_folder_this_process_cannot_write_into_is_refused(tmp_path, monkeypatch):
  # os.access, not chmod: a test running as root may write anywhere.
  monkeypatch.setattr(os, 'access', lambda path, mode: path != str(tmp_path))
  with pytest.raises(ValueError, match=f'workdir {tmp_path}/run: {tmp_path} is not writable'):
    folders.check_output_folder(str(tmp_path / 'run'), 'workdir')
  folders.check_output_folder(str(tmp_path.parent / 'elsewhere'), 'workdir')


def test_an_output_file_must_not_be_a_folder_and_its_folder_must_be_possible(tmp_path):
  file = tmp_path / 'notes.txt'
  file.write_text('mine')
  folders.check_output_file(str(tmp_path / 'new' / 'eval.json'), '--out')   # made later
  folders.check_output_file('eval.json', '--out')                           # here
  for path, why in ((tmp_path, 'is a folder; give the path of a file'),
                    (file / 'eval.json', f'{file} is not a folder'),
                    (file / 'sub' / 'eval.json', f'{file} is a file, so {file}/sub cannot be '
                                                 'a folder')):
    with pytest.raises(ValueError) as error:
      folders.check_output_file(str(path), '--out')
    assert str(error.value) == f'--out {path}: {why}'
  assert os.listdir(tmp_path) == ['notes.txt']
