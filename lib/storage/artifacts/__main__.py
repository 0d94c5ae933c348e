"""python -m lib.storage.artifacts [--readme]: print the table of a run folder's files, or rewrite README.md's copy."""
import sys

from lib import REPO_ROOT
from lib.storage.artifacts.readme import outputs_table, readme_with_table

if sys.argv[1:] == ["--readme"]:
    readme = REPO_ROOT / "README.md"
    readme.write_text(readme_with_table(readme.read_text()))
    print(f"updated the artifacts table in {readme}")
else:
    print(outputs_table())
