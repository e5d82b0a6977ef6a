// SPDX-License-Identifier: GPL-2.0
/*
 * numareuse selector: BPF_PROG_TYPE_SK_REUSEPORT.
 *
 * Picks the listening (TCP) or bound (UDP) socket for a new connection or
 * datagram from the region of the REUSEPORT_SOCKARRAY that belongs to the
 * domain of the CPU processing the packet (with NIC IRQs on NUMA-local CPUs
 * that is the receiving queue's domain), then from the wildcard region, and
 * otherwise leaves the choice to the kernel's own hash.  It never drops.
 *
 * Every constant comes from numareuse/_layout.py as a -D define:
 *   NR_DOMAINS      regions 0..NR_DOMAINS-1 are domains, region NR_DOMAINS
 *                   is the wildcard
 *   CAPACITY        slots per region; slot = region * CAPACITY + index
 *   PROBE_MAX       how many slots a region is probed past empty ones
 *   C_*             counter indexes
 *   *_FD            map fds, turned into map pointers by the loader
 */
#include <uapi/linux/bpf.h>

#define MAP(fd) ((void *)bpf_pseudo_fd(1, fd))
#define WILDCARD_REGION NR_DOMAINS

static __always_inline void count(u32 idx, u64 n)
{
	u64 *v = bpf_map_lookup_elem(MAP(COUNTERS_FD), &idx);

	if (v)
		*v += n; /* per-CPU: no atomics needed */
}

/*
 * Select a live socket of @region for @hash; add the empty slots probed past
 * to *@skipped.  Returns 1 when a socket was selected, 0 when the region has
 * none alive within the probe bound.  The controller keeps slots compact, so
 * the first probe hits except between a socket's close and the next sweep.
 */
static __always_inline int pick(struct sk_reuseport_md *ctx, u32 region, u32 hash, u64 *skipped)
{
	u32 *cnt = bpf_map_lookup_elem(MAP(REGION_COUNT_FD), &region);
	u32 n, idx, key, i;

	if (!cnt)
		return 0;
	n = *cnt;
	if (n == 0)
		return 0;
	if (n > CAPACITY)
		n = CAPACITY;
	/* the kernel's reciprocal_scale(): a flow keeps its slot while n is unchanged */
	idx = ((u64)hash * n) >> 32;
#pragma unroll
	for (i = 0; i < PROBE_MAX; i++) {
		if (i >= n)
			break;
		key = region * CAPACITY + idx;
		/* 0 on success; -ENOENT for an empty slot (its socket closed) */
		if (bpf_sk_select_reuseport(ctx, MAP(SOCKARRAY_FD), &key, 0) == 0)
			return 1;
		(*skipped)++;
		idx = idx + 1 == n ? 0 : idx + 1;
	}
	return 0;
}

int numareuse_select(struct sk_reuseport_md *ctx)
{
	u32 cpu = bpf_get_smp_processor_id();
	u32 *dom = bpf_map_lookup_elem(MAP(CPU_DOMAIN_FD), &cpu);
	u32 region = dom ? *dom : WILDCARD_REGION;
	u32 hash = ctx->hash;
	u64 skipped = 0;
	u32 outcome;

	if (region < NR_DOMAINS && pick(ctx, region, hash, &skipped))
		outcome = C_LOCAL;
	else if (pick(ctx, WILDCARD_REGION, hash, &skipped))
		outcome = C_WILDCARD;
	else
		outcome = C_FALLBACK; /* SK_PASS, no selection: the kernel hashes over the whole group */
	count(outcome, 1);
	if (skipped)
		count(C_EMPTY_SKIPPED, skipped);
	return SK_PASS; /* never SK_DROP: that would refuse the connection */
}
