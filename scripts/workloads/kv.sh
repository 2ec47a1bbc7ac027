# A key-value store under load: redis-server (the program measured, started
# through $RUN) filled and then read at random by redis-benchmark.
# usage: RUN=... sh kv.sh SCALE PORT     (SCALE 1.0: ~1 GiB of values)
set -eu
scale=$1; port=$2
keys=$(awk -v s="$scale" 'BEGIN { k = int(1000000 * s); print (k < 5000 ? 5000 : k) }')
$RUN /usr/bin/redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no --logfile '' --loglevel warning >/dev/null &
server=$!
i=0
until redis-cli -p "$port" ping >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -lt 600 ] || { echo "redis did not start" >&2; exit 1; }
    sleep 0.1
done
redis-benchmark -p "$port" -q -t set -n "$keys" -r "$keys" -d 1000 -P 16 -c 4 >/dev/null
redis-benchmark -p "$port" -q -t get -n "$keys" -r "$keys" -P 16 -c 4 >/dev/null
echo "keys: $(redis-cli -p "$port" dbsize | awk '{ print ($1 > 0) ? "loaded" : "none" }')"
redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
wait $server || true
