#!/bin/sh
# Rebuilds plots/offline.html, DVC's HTML template with vega, vega-lite and vega-embed inlined (the
# versions of DVC's own page), from the npm registry's packages. Run from the repository root.
set -eu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2 >/dev/null)
for pkg in vega-5.20.2 vega-lite-5.2.0 vega-embed-6.18.2; do
    mkdir "$tmp/$pkg" && tar xzf "$tmp/$pkg.tgz" -C "$tmp/$pkg"
done
python3 - "$tmp" <<'PY'
import re, sys
from pathlib import Path
src, page = Path(sys.argv[1]), Path("plots/offline.html")
text = page.read_text()
for name, ver in (("vega", "5.20.2"), ("vega-lite", "5.2.0"), ("vega-embed", "6.18.2")):
    js = (src / f"{name}-{ver}" / "package" / "build" / f"{name}.min.js").read_text()
    head = f"<script>/* {name} {ver} (BSD-3-Clause, plots/LICENSES.txt) */\n"
    text = re.sub(re.escape(head) + r".*?\n    </script>", lambda m: head + js + "\n    </script>", text, flags=re.S)
page.write_text(text)
PY
