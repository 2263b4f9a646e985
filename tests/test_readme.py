"""The README's Python examples run as written."""

import os
import re

README = os.path.join(os.path.dirname(__file__), '..', 'README.md')


def test_readme_python_blocks_run():
  text = open(README).read()
  blocks = re.findall(r'```python\n(.*?)```', text, flags=re.S)
  assert blocks
  for block in blocks:
    exec(compile(block, 'README.md', 'exec'), {})
