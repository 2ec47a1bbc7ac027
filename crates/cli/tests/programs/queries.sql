-- An in-memory database and a query workload: inserts, an index, joins,
-- aggregates and updates.
CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 600000)
INSERT INTO t SELECT x, (x * 2654435761) % 100003, printf('value-%d-%s', x, hex(randomblob(0) || x)) FROM c;
CREATE INDEX t_k ON t(k);
CREATE TABLE u AS SELECT k, count(*) AS n, sum(id) AS s FROM t GROUP BY k;
SELECT count(*), sum(k), max(length(v)) FROM t;
SELECT k, n, s FROM u ORDER BY n DESC, k LIMIT 5;
UPDATE t SET v = v || '-updated' WHERE k % 7 = 3;
SELECT count(*) FROM t WHERE v LIKE '%-updated';
SELECT t.k, count(*) FROM t JOIN u ON t.k = u.k WHERE u.n > 5 GROUP BY t.k ORDER BY 2 DESC, 1 LIMIT 3;
SELECT sum(length(v)) FROM t WHERE id % 3 = 0;
