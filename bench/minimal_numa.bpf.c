// SPDX-License-Identifier: GPL-2.0
/*
 * Baseline for `make vm-bench` on real NUMA nodes: Linux's
 * selftests/net/reuseport_bpf_numa.c in SK_REUSEPORT form.  The sockarray
 * index is the NUMA node of the CPU processing the packet, so each node can
 * hold exactly one socket; a node whose socket is missing falls back to the
 * kernel's hash over the whole group.
 *
 *   SOCKARRAY_FD   REUSEPORT_SOCKARRAY with one slot per node id
 */
#include <uapi/linux/bpf.h>

#define MAP(fd) ((void *)bpf_pseudo_fd(1, fd))

int minimal_numa_select(struct sk_reuseport_md *ctx)
{
	u32 node = bpf_get_numa_node_id();

	bpf_sk_select_reuseport(ctx, MAP(SOCKARRAY_FD), &node, 0);
	return SK_PASS;
}
