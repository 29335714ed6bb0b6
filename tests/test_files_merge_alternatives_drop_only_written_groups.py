"""merge_into_folder's `alternatives`: the old folder's files of a group (one save's possible formats) are dropped
only where the new save wrote a file of that same group (a loader preferring the stale format would read it); a
group the save did not write keeps its old files, at the top and in subfolders the save also wrote."""
from fastft.files import merge_into_folder

WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SHARDS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")


def _write(**files):
    def fill(folder):
        for name, text in files.items():
            path = folder / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return fill


def test_only_the_groups_the_save_wrote_lose_their_old_files(tmp_path):
    target = tmp_path / "adapter"
    merge_into_folder(target, _write(**{"adapter_model.bin": "old", "model-00001-of-00002.safetensors": "old",
                                        "second__adapter_model.bin": "old", "notes.txt": "mine"}))
    merge_into_folder(target, _write(**{"adapter_model.safetensors": "new", "second__README.md": "new"}),
                      alternatives=(WEIGHTS, SHARDS))
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_model.safetensors", "model-00001-of-00002.safetensors", "notes.txt", "second"]
    # the save wrote `second/` too, but no weights in it: its old weights stay
    assert sorted(p.name for p in (target / "second").iterdir()) == ["README.md", "adapter_model.bin"]
    assert (target / "model-00001-of-00002.safetensors").read_text() == "old"
    merge_into_folder(target, _write(**{"model.safetensors": "new"}), alternatives=(WEIGHTS, SHARDS))
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_model.safetensors", "model.safetensors", "notes.txt", "second"]
