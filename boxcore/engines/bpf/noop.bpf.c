// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* An XDP program that passes everything: the benchmark's reference for what attaching any XDP
 * program costs on an interface (on a veth pair: its NAPI mode), apart from boxd's classifier. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int boxd_noop(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
