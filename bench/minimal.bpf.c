// SPDX-License-Identifier: GPL-2.0
/*
 * Baseline programs for `make bench`, loaded with bcc the way numareuse loads
 * bpf/selector.bpf.c (map fds passed as -D defines).
 *
 * minimal_select: the idea of Linux's selftests/net/reuseport_bpf_numa.c in
 * SK_REUSEPORT form: one socket per domain, sockarray index = domain id.
 * Upstream the key is bpf_get_numa_node_id() (and the selftest returns it as
 * the group index from a SOCKET_FILTER program); this machine has one node,
 * so the bench uses one virtual domain per CPU and the CPU id stands in for
 * the node id: the same single helper call.  A domain can hold one socket
 * only, and when that socket closes its domain falls back to the kernel's
 * hash over the whole group.
 *
 * noop_select: SK_PASS without a selection; the floor of the kernel's
 * run_time_ns accounting (two clock reads around the program).
 *
 *   SOCKARRAY_FD   REUSEPORT_SOCKARRAY with one slot per domain
 */
#include <uapi/linux/bpf.h>

#define MAP(fd) ((void *)bpf_pseudo_fd(1, fd))

int minimal_select(struct sk_reuseport_md *ctx)
{
	u32 node = bpf_get_smp_processor_id();

	bpf_sk_select_reuseport(ctx, MAP(SOCKARRAY_FD), &node, 0);
	return SK_PASS;
}

int noop_select(struct sk_reuseport_md *ctx)
{
	return SK_PASS;
}
