// SPDX-License-Identifier: GPL-2.0
/*
 * Diagnostic baseline for `make bench`: the selftest-style program spread over
 * SPREAD_N sockets, slot = the flow hash scaled to SPREAD_N (the kernel's
 * reciprocal_scale), times STRIDE.  It has none of numareuse's logic, so its
 * cost at 4 and at 1024 sockets shows what bpf_sk_select_reuseport itself
 * costs when the selections touch that many distinct sockets; STRIDE 8 puts
 * each socket's pointer in the sockarray on a cache line of its own (the
 * array holds 8-byte pointers), so that the pointer's line and the socket's
 * own line can be told apart.
 *
 *   SOCKARRAY_FD   REUSEPORT_SOCKARRAY with SPREAD_N * STRIDE slots
 *   SPREAD_N       number of sockets, in slots 0, STRIDE, 2 * STRIDE, ...
 *   STRIDE         slots between two sockets
 */
#include <uapi/linux/bpf.h>

#define MAP(fd) ((void *)bpf_pseudo_fd(1, fd))

int spread_select(struct sk_reuseport_md *ctx)
{
	u32 slot = (u32)(((u64)ctx->hash * SPREAD_N) >> 32) * STRIDE;

	bpf_sk_select_reuseport(ctx, MAP(SOCKARRAY_FD), &slot, 0);
	return SK_PASS;
}
