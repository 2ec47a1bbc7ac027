# GNU sort of a text file held entirely in its memory buffer (no temporary
# files), output checksummed. The input is made by gen_lines.py beforehand.
# usage: RUN=... bash sort.sh INPUT
set -euo pipefail
$RUN /usr/bin/sort -S 3G --parallel=2 -T /nonexistent "$1" | md5sum
