"""The fake hub of tests/test_downloader.py is ModelScope's real protocol: the ``modelscope`` package's own
``snapshot_download`` (pointed at it with ``endpoint=``) and the project's downloader fetch identical trees,
anonymously and with a token, and neither makes a login request.  This is what keeps ``modelscope`` in the
requirements: the proof that the downloader's REST paths are the client's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from downloader import MARKER, download
from tests.test_downloader import TOKEN, FakeHub, hub, other_tokenizer_files, read_tree, tiny_files, values_for

__all__ = ["hub", "other_tokenizer_files", "tiny_files"]  # fixtures of tests/test_downloader.py, used here


@pytest.mark.parametrize("token", ["", TOKEN], ids=["anonymous", "token"])
def test_modelscope_client_fetches_the_same_tree_from_the_fake_hub(tmp_path: Path, hub: FakeHub, token: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``modelscope`` package's own snapshot_download and the downloader, against one hub: identical trees."""
    from modelscope import snapshot_download

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # modelscope keeps its state under ~
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    hub.require_token = token or None
    theirs = tmp_path / "modelscope"
    snapshot_download("acme/nested", revision="master", local_dir=str(theirs), endpoint=hub.url,
                      token=token or None)
    their_requests = [(s.method, s.path) for s in hub.seen]
    ours = download(values_for(tmp_path, hub.url, MODEL_ID="acme/nested", MODELSCOPE_API_TOKEN=token),
                    progress=False)[0]
    mine = {name: data for name, data in read_tree(ours).items() if name != MARKER}
    assert read_tree(theirs) == mine and "sub/extra.txt" in mine and "config.json" in mine
    assert ("GET", "/api/v1/models/acme/nested/repo/files") in their_requests
    assert not any(method == "POST" for method, _ in their_requests), "modelscope makes no login request either"
