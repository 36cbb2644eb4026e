"""The fixed photo split of docs/real_photo_detectors.md (run once, before any training)."""
import hashlib, re
from pathlib import Path

ROOT = Path("../shared/data")
FOLDERS = ["faces", "facenet_test_images", "coco8", "mobilenet_v1_tfslim/photos"]
photos = sorted(p for f in FOLDERS for p in (ROOT / f).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos}

def group(p):
    rel = p.relative_to(ROOT).as_posix()
    # derived images stay with their source photo: facenet-pytorch's aligned crops, deepface's mirror
    m = re.fullmatch(r"facenet_test_images/test_images(?:_aligned)?/(\w+)/1\.\w+", rel)
    if m:
        return "person:" + m.group(1)
    m = re.fullmatch(r"faces/deepface/(img\d+)(?:_reflection)?\.jpg", rel)
    if m:
        return "deepface:" + m.group(1)
    # face_recognition's partial faces are crops of obama.jpg, and 32bit.png is obama2.jpg re-encoded
    derived = {"obama_partial_face.jpg": "obama.jpg", "obama_partial_face2.jpg": "obama.jpg", "32bit.png": "obama2.jpg"}
    if rel.startswith("faces/face_recognition/test_images/") and p.name in derived:
        p = p.with_name(derived[p.name])
    return "content:" + digest[p]

groups = {}
for p in photos:
    groups.setdefault(group(p), []).append(p)
# exact copies (same bytes) are kept once: the first path in sorted order
order = sorted(groups, key=lambda g: digest[groups[g][0]])
splits = {"heldout": order[:24], "val": order[24:40], "train": order[40:]}
for name, keys in splits.items():
    seen, lines = set(), []
    for key in keys:
        for p in groups[key]:
            if digest[p] not in seen:
                seen.add(digest[p])
                lines.append(p.relative_to(ROOT).as_posix())
    Path(f"configs/real_faces_split/{name}.txt").write_text("\n".join(sorted(lines)) + "\n")
    print(name, len(keys), "groups", len(lines), "photos")
