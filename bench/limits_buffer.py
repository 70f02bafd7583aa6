"""Redis buffer: rollout groups/s through RolloutBuffer (put_many / take / ack) over raw redis-py on the same bytes.

    python bench/limits_buffer.py --out runs/bench-limits          # ~30 s idle
    python bench/limits_buffer.py --quick

Payload: real RolloutGroups, the tiny model's `shapes` prompts (image patches included) with G=8 sampled
completions, log-probs and rewards, as a rollout worker publishes them. One private Redis server (the run's
default config: no AOF). clsrl side: `put_many` of a chunk of groups (encode + one MULTI of XADDs), `take(n)`
(XAUTOCLAIM for dead consumers' entries, XREADGROUP, decode) and `ack` (XACK + XDEL in one MULTI). Raw side:
the bytes encoded once beforehand, the same fields XADDed in a plain pipeline, XREADGROUP, and XACK + XDEL in
a plain pipeline (the XDEL so that both leave the stream holding only unfinished work). Each on its own stream,
in alternating order per round; the tables use medians.
"""
from __future__ import annotations

import uuid

import limits_common as lc

TARGET = 0.8
MiB = 2**20


def fields_of(group) -> dict:
    """What RolloutBuffer.put_many writes per group (stream/buffer.py)."""
    from stream.codec import FORMAT_VERSION, encode_group

    return {"g": encode_group(group), "prompt_id": group.request.prompt_id, "policy_version": str(group.policy_version),
            "v": str(FORMAT_VERSION)}


def clsrl_round(url: str, cfg, groups: list, chunk: int, take_n: int) -> tuple[float, float, int]:
    from stream.buffer import RolloutBuffer

    with RolloutBuffer(url, f"bench:{uuid.uuid4().hex}", "learners", "learner-0", maxlen=10 * len(groups), cfg=cfg) as buf:
        buf.ensure_group()
        write_s, _ = lc.timed(lambda: [buf.put_many(groups[i:i + chunk]) for i in range(0, len(groups), chunk)])

        def read() -> int:
            got = 0
            while got < len(groups):
                entries = buf.take(take_n)
                buf.ack([eid for eid, _ in entries])
                got += len(entries)
            return got

        read_s, got = lc.timed(read)
        buf.reset()
    return write_s, read_s, got


def raw_round(client, payloads: list[dict], chunk: int, take_n: int) -> tuple[float, float, int]:
    stream, maxlen = f"bench:{uuid.uuid4().hex}", 10 * len(payloads)
    client.xgroup_create(stream, "learners", id="0", mkstream=True)

    def write() -> None:
        for i in range(0, len(payloads), chunk):
            pipe = client.pipeline(transaction=False)
            for fields in payloads[i:i + chunk]:
                pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)
            pipe.execute()

    def read() -> int:
        got = 0
        while got < len(payloads):
            resp = client.xreadgroup("learners", "learner-0", {stream: ">"}, count=take_n)
            ids = [eid for _, entries in (resp.items() if isinstance(resp, dict) else resp) for eid, _ in entries]
            pipe = client.pipeline(transaction=False)
            pipe.xack(stream, "learners", *ids)
            pipe.xdel(stream, *ids)
            pipe.execute()
            got += len(ids)
        return got

    write_s, _ = lc.timed(write)
    read_s, got = lc.timed(read)
    client.delete(stream)
    return write_s, read_s, got


def codec_costs(groups: list) -> dict:
    """Encode and decode alone, per group: the codec's share of clsrl's side."""
    from stream.codec import decode_group, encode_group

    enc_s, blobs = lc.timed(lambda: [encode_group(g) for g in groups])
    dec_s, _ = lc.timed(lambda: [decode_group(b) for b in blobs])
    return {"encode_ms_per_group": 1e3 * enc_s / len(groups), "decode_ms_per_group": 1e3 * dec_s / len(groups)}


def run(groups: list, total: int, rounds: int, chunk: int, take_n: int) -> dict:
    import tempfile

    from protocol.components import RedisConfig
    from stream.server import PrivateRedis

    batch = [groups[i % len(groups)] for i in range(total)]
    payloads = [fields_of(g) for g in batch]  # the raw side's bytes: encoded once, outside its timing
    cfg, rows = RedisConfig(), []
    with tempfile.TemporaryDirectory() as tmp, PrivateRedis(cfg, tmp) as server:
        client = server.client()
        for r in range(rounds + 1):  # round 0 warms up (connections, server allocations)
            sides = [("clsrl", lambda: clsrl_round(server.url, cfg, batch, chunk, take_n)),
                     ("raw", lambda: raw_round(client, payloads, chunk, take_n))]
            out = {}
            for name, fn in (sides if r % 2 == 0 else sides[::-1]):
                write_s, read_s, got = fn()
                out.update({f"{name}_write_s": write_s, f"{name}_read_s": read_s, f"{name}_read": got})
            if r:
                rows.append(out)
                lc.progress(f"buffer round {r}/{rounds}: write clsrl {out['clsrl_write_s']:.3f} s raw {out['raw_write_s']:.3f} s,"
                            f" read+ack clsrl {out['clsrl_read_s']:.3f} s raw {out['raw_read_s']:.3f} s")
        client.close()
    return summarize(rows, total, chunk, take_n, sum(len(p["g"]) for p in payloads) / total)


def summarize(rows: list[dict], total: int, chunk: int, take_n: int, group_bytes: float) -> dict:
    med = {k: lc.stats([r[k] for r in rows])["median"] for k in rows[0]}
    out = {"groups_per_round": total, "put_chunk": chunk, "take_n": take_n, "rounds": len(rows),
           "group_bytes": group_bytes, "all_read": all(r["clsrl_read"] == r["raw_read"] == total for r in rows),
           "target": TARGET, "rounds_raw": rows}
    for op in ("write", "read"):
        clsrl, raw = total / med[f"clsrl_{op}_s"], total / med[f"raw_{op}_s"]
        out[op] = {"clsrl_groups_per_s": clsrl, "raw_groups_per_s": raw,
                   "clsrl_mib_per_s": clsrl * group_bytes / MiB, "raw_mib_per_s": raw * group_bytes / MiB,
                   "ratio": clsrl / raw,  # of the medians, as the table's rates
                   "ratio_median_of_rounds": lc.stats([r[f"raw_{op}_s"] / r[f"clsrl_{op}_s"] for r in rows])["median"]}
    return out


def table(r: dict) -> str:
    rows = []
    for op, what in (("write", f"put_many x{r['put_chunk']}"), ("read", f"take({r['take_n']}) + ack")):
        x = r[op]
        rows.append([what, f"{x['raw_groups_per_s']:,.0f}", f"{x['clsrl_groups_per_s']:,.0f}", f"{x['raw_mib_per_s']:,.0f}",
                     f"{x['clsrl_mib_per_s']:,.0f}", f"**{x['ratio']:.2f}**"])
    return lc.md_table(["operation", "raw groups/s", "clsrl groups/s", "raw MiB/s", "clsrl MiB/s",
                        f"ratio (target >= {TARGET})"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = lc.arg_parser(__doc__)
    ap.add_argument("--groups", type=int, default=512, help="groups written and read per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=16, help="groups per put_many (rollout.prompts_per_call)")
    ap.add_argument("--take", type=int, default=16, help="groups per take (a learner rank's share of a step)")
    args = ap.parse_args(argv)
    total, rounds = (32, 2) if args.quick else (args.groups, args.rounds)
    lc.progress("buffer: sampling real rollout groups from the tiny model")
    groups = lc.make_groups(16)
    result = run(groups, total, rounds, args.chunk, args.take)
    result["codec"] = codec_costs(groups)
    path = lc.write_report(args.out, "limits_buffer", {"quick": args.quick, **result})
    print(f"\n{total} groups per round of {result['group_bytes'] / 1024:.0f} KiB each (G=8), median of {rounds} rounds; "
          f"encode {result['codec']['encode_ms_per_group']:.2f} ms, decode {result['codec']['decode_ms_per_group']:.2f} ms "
          f"per group\n\n" + table(result) + f"\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
