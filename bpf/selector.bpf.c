// SPDX-License-Identifier: GPL-2.0
/*
 * numareuse selector: BPF_PROG_TYPE_SK_REUSEPORT, layout version 2.
 *
 * Picks the listening (TCP) or bound (UDP) socket for a new connection or
 * datagram from the region of a REUSEPORT_SOCKARRAY that belongs to the
 * domain of the CPU processing the packet (with NIC IRQs on NUMA-local CPUs
 * that is the receiving queue's domain), then from the wildcard region, then
 * from any region that has a socket ("remote"), and otherwise leaves the
 * choice to the kernel's own hash.  It never drops.
 *
 * Loaded with expected attach type BPF_SK_REUSEPORT_SELECT_OR_MIGRATE (5.14+)
 * it also runs when a listener closes, once per queued or in-flight
 * connection (ctx->migrating_sk set): the connection then goes to a socket of
 * the closing socket's own region, found through its cookie, because the CPU
 * running the program is not the connection's (close() runs it on the
 * closing CPU, the final ACK or the SYN-ACK timer on theirs).
 *
 * Inside a region, a bucket table refilled by the controller names the slot
 * of each hash bucket, so that a socket joining or leaving a region of n
 * moves about 1/n of the flows (UDP flows keep their socket).
 *
 * Every constant comes from numareuse/_layout.py as a -D define:
 *   NR_DOMAINS      regions 0..NR_DOMAINS-1 are domains, region NR_DOMAINS
 *                   is the wildcard
 *   CAPACITY        slots per region; slot = region * CAPACITY + index
 *   NR_BUCKETS      buckets per region (a power of two)
 *   PROBE_MAX       how many slots a region is probed past empty ones
 *   HAVE_MIGRATE    the kernel's sk_reuseport_md has migrating_sk (5.14+)
 *   REGION_DRAINED  cookie_region value of a drained socket
 *   C_*             counter indexes
 *   *_FD            map fds, patched in by the loader
 */
#include <uapi/linux/bpf.h>

#define MAP(fd) ((void *)bpf_pseudo_fd(1, fd))
#define WILDCARD_REGION NR_DOMAINS

/* cookie_region values; the controller also writes since = when it stopped steering to it */
struct cookie_region {
	u32 region; /* 0..NR_DOMAINS, or REGION_DRAINED */
	u32 since;  /* CLOCK_BOOTTIME seconds, 0 while registered */
};

static __always_inline void count(u32 idx, u64 n)
{
	u64 *v = bpf_map_lookup_elem(MAP(COUNTERS_FD), &idx);

	if (v)
		*v += n; /* per-CPU: no atomics needed */
}

/*
 * Select a live socket of @region for @hash.  Returns 1 when a socket was
 * selected, 0 when the region has none alive within the probe bound.  The
 * controller keeps slots compact, so the first probe hits except between a
 * socket's close and the next sweep.  Empty slots are counted where they are
 * met (a rare path): a count carried back would differ per iteration and
 * keep the verifier from merging the paths after a hit (76k instructions
 * processed instead of a few thousand).
 */
static __always_inline int pick(struct sk_reuseport_md *ctx, u32 region, u32 hash)
{
	u32 *cnt, *b, n, idx, key, i;

	if (region > WILDCARD_REGION)
		return 0;
	cnt = bpf_map_lookup_elem(MAP(REGION_COUNT_FD), &region);
	if (!cnt)
		return 0;
	n = *cnt;
	if (n == 0)
		return 0;
	if (n > CAPACITY)
		n = CAPACITY;
	key = region * NR_BUCKETS + (hash & (NR_BUCKETS - 1));
	b = bpf_map_lookup_elem(MAP(BUCKETS_FD), &key);
	if (b && *b < n)
		idx = *b;
	else /* table not filled for this count yet: the kernel's reciprocal_scale() */
		idx = ((u64)hash * n) >> 32;
#pragma unroll
	for (i = 0; i < PROBE_MAX; i++) {
		key = region * CAPACITY + idx;
		/* 0 on success; -ENOENT for an empty slot (its socket closed) */
		if (bpf_sk_select_reuseport(ctx, MAP(SOCKARRAY_FD), &key, 0) == 0)
			return 1;
		count(C_EMPTY_SKIPPED, 1);
		if (i + 1 >= n)
			break;
		idx = idx + 1 >= n ? 0 : idx + 1;
	}
	return 0;
}

/* One probe of @region at the hash's bucket (whose owner is live but for a close since the last sweep). */
static __always_inline int pick_one(struct sk_reuseport_md *ctx, u32 region, u32 hash)
{
	u32 *cnt, *b, n, key;

	if (region > WILDCARD_REGION)
		return 0;
	cnt = bpf_map_lookup_elem(MAP(REGION_COUNT_FD), &region);
	if (!cnt)
		return 0;
	n = *cnt;
	if (n == 0)
		return 0;
	if (n > CAPACITY)
		n = CAPACITY;
	key = region * NR_BUCKETS + (hash & (NR_BUCKETS - 1));
	b = bpf_map_lookup_elem(MAP(BUCKETS_FD), &key);
	key = region * CAPACITY + (b && *b < n ? *b : (u32)(((u64)hash * n) >> 32));
	return bpf_sk_select_reuseport(ctx, MAP(SOCKARRAY_FD), &key, 0) == 0;
}

/*
 * Another region with a socket, from the controller's list of non-empty regions:
 * up to 4 entries from a hashed start, past @tried (the packet's own region) and
 * the wildcard, both tried already.  A region's count can still
 * include sockets closed since the last sweep (a closing listener's own region
 * during migration), so one failed region must not end the search; one probe
 * per region keeps this last resort small for the verifier (a full probe per
 * try overflowed its stack of pending branches).
 */
static __always_inline int remote_try(struct sk_reuseport_md *ctx, u32 hash, u32 tried, u32 n, u32 *j)
{
	u32 key = 1 + *j, *r = bpf_map_lookup_elem(MAP(SPILL_FD), &key);

	*j = *j + 1 >= n ? 0 : *j + 1;
	return r && *r != tried && *r != WILDCARD_REGION && pick_one(ctx, *r, hash);
}

static __always_inline int pick_remote(struct sk_reuseport_md *ctx, u32 hash, u32 tried)
{
	u32 zero = 0, *k, n, j;

	k = bpf_map_lookup_elem(MAP(SPILL_FD), &zero);
	if (!k)
		return 0;
	n = *k;
	if (n == 0 || n > NR_DOMAINS + 1)
		return 0;
	j = (u32)(((u64)hash * n) >> 32);
	/* unrolled by hand: clang 14 keeps a loop with a variable exit, which the verifier cannot bound */
	return remote_try(ctx, hash, tried, n, &j) || (n > 1 && remote_try(ctx, hash, tried, n, &j)) ||
	       (n > 2 && remote_try(ctx, hash, tried, n, &j)) || (n > 3 && remote_try(ctx, hash, tried, n, &j));
}

static __always_inline u32 cpu_region(void)
{
	u32 cpu = bpf_get_smp_processor_id();
	u32 *dom = bpf_map_lookup_elem(MAP(CPU_DOMAIN_FD), &cpu);

	return dom ? *dom : WILDCARD_REGION;
}

int numareuse_select(struct sk_reuseport_md *ctx)
{
	u32 region, hash = ctx->hash, base = C_LOCAL;

#if HAVE_MIGRATE
	if (ctx->migrating_sk) {
		/* ctx->sk is the closing listener; its own slot is already empty */
		u64 cookie = bpf_get_socket_cookie(ctx->sk);
		struct cookie_region *r = bpf_map_lookup_elem(MAP(COOKIE_REGION_FD), &cookie);

		base = C_MIGRATED_LOCAL;
		if (r && r->region <= WILDCARD_REGION) {
			region = r->region;
		} else {
			/* drained or never registered: the CPU's domain */
			region = cpu_region();
			count(C_MIGRATED_UNOWNED, 1);
		}
	} else
#endif
		region = cpu_region();

	if (region < NR_DOMAINS && pick(ctx, region, hash))
		count(base, 1);
	else if (pick(ctx, WILDCARD_REGION, hash))
		count(base + (C_WILDCARD - C_LOCAL), 1);
	else if (pick_remote(ctx, hash, region))
		count(base == C_LOCAL ? C_REMOTE : C_MIGRATED_REMOTE, 1);
	else /* SK_PASS, no selection: the kernel hashes over the whole group */
		count(base == C_LOCAL ? C_FALLBACK : C_MIGRATED_FALLBACK, 1);
	return SK_PASS; /* never SK_DROP: that would refuse the connection */
}
