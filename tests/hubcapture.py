"""An intercepted Hub: huggingface_hub's create_repo and create_commit (its API boundary) are
replaced for the test; committed files land in a folder that `from_pretrained` can read."""

from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.hf_api import RepoUrl


class Captured:
    """Stands in for the Hub: records create_repo and writes create_commit's files to a folder."""

    def __init__(self, root: Path):
        self.root, self.repos, self.commits = root, [], []

    def create_repo(self, api, repo_id, private=None, exist_ok=False, repo_type=None, **kw):
        self.repos.append((repo_id, private))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api, repo_id, operations, commit_message=None, **kw):
        self.commits.append((repo_id, commit_message, kw))
        folder = self.root / repo_id.replace("/", "--")
        for op in operations:
            assert isinstance(op, CommitOperationAdd)
            target = folder / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            src = op.path_or_fileobj
            target.write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    captured = Captured(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: captured.create_repo(self, *a, **k))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, *a, **k: captured.create_commit(self, *a, **k))
    return captured
