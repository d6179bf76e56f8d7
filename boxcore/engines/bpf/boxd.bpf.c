// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* The xdp engine's data path (docs/xdp-engine.md).
 *
 * boxd_xdp (XDP, every box interface): parses IPv4, classifies with the same semantics as
 * boxcore.classifier (the oracle), counts per rule in per-CPU maps, drops (DROP), sends copies
 * to a ring buffer (COPY) and passes everything else.  Packets a REDIRECT / intercept /
 * MULTICAST rule won carry 8 bytes of XDP metadata {MAGIC, slot} to the tc program.
 *
 * boxd_tc (tc clsact ingress, same interfaces + the multicast injection veth): reads the
 * metadata and hands the packet to the booster's socket (bpf_sk_assign plus a mark that
 * policy-routes it to local delivery), or fans it out to a group's members (one clone per
 * member with the destination rewritten), or lets it go on.  No metadata: it goes on.
 *
 * Fail-open: when boxd stops renewing its lease (config.lease_until_ns) the XDP program
 * passes everything; a REDIRECT whose socket is gone (booster dead) passes in tc.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_RULES 4096
#define BUCKET 32            /* rules per candidate list */
#define MAX_CHUNKS 4         /* payload tests per rule, each up to 8 bytes */
#define MAX_COPIES 8         /* COPY rules one packet may feed */
#define MAX_MEMBERS 256      /* members of one multicast group */
#define COPY_SNAP 1536       /* bytes of a packet a copy carries */
#define MAX_PAYLOAD_OFFSET 1500
#define META_MAGIC 0xb0057e12

enum action { A_NONE = 0, A_FORWARD = 1, A_REDIRECT = 2, A_COPY = 3, A_DROP = 4, A_MULTICAST = 5,
              A_INTERCEPT = 6 };
enum flags { F_PROTO = 1, F_SRC = 2, F_DST = 4 };
enum stat { S_PACKETS, S_LEASE_EXPIRED, S_COPY_LOST, S_ASSIGNED, S_NO_SOCKET, S_ASSIGN_FAILED,
            S_FANOUT_OUT, S_FANOUT_FAILED, S_NO_NEIGH, S_NO_GROUP, S_NO_META, S_REPLY_STEERED, S_NSTATS };

struct chunk {
	__u16 offset;        /* into the transport payload */
	__u8 len;            /* 1..8 */
	__u8 pad[5];
	__u8 value[8];       /* already masked */
	__u8 mask[8];
};

struct rule {
	__u64 order;         /* smaller wins: (PRIORITY_MAX - priority) << 32 | install sequence */
	__u64 cookie;
	__u32 src_net, src_mask, dst_net, dst_mask;   /* network byte order */
	__u16 sport_lo, sport_hi, dport_lo, dport_hi;
	__u8 proto, flags, action, nchunks;
	__u16 payload_end;
	__u16 pad;
	__u32 group;
	__u32 pad2;
	struct chunk chunks[MAX_CHUNKS];
};

struct slot_list {
	__u32 n;
	__u32 slot[BUCKET];
};

struct exact_key {
	__u32 src, dst;      /* network byte order */
	__u16 sport, dport;  /* host order */
	__u8 proto, pad[3];
};

struct lpm_key {
	__u32 prefixlen;
	__u32 addr;          /* network byte order */
};

struct counter {
	__u64 packets, bytes;
};

struct config {
	__u64 lease_until_ns;   /* boxd renews it; past it, everything passes */
	__u32 mark;             /* skb mark that policy-routes assigned packets to local delivery */
	__u32 mcast_ifindex;    /* the injection veth whose ingress carries send_multicast frames */
	__u32 steer_replies;    /* TCP interception installed: steer replies to boosters' own sockets */
	__u32 pad;
};

struct member {
	__u32 addr;          /* network byte order */
	__u16 port;          /* network byte order */
	__u16 pad;
};

struct group {
	__u32 n;
	__u32 pad;
	struct member m[MAX_MEMBERS];
};

struct copy_rec {
	__u64 cookie;
	__u32 len;           /* bytes of data (the IPv4 packet, cut at COPY_SNAP) */
	__u32 wire_len;      /* the IPv4 total length */
	__u8 data[COPY_SNAP];
};

struct meta {
	__u32 magic;
	__u32 slot;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_RULES);
	__type(key, __u32);
	__type(value, struct rule);
} rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_RULES);
	__type(key, struct exact_key);
	__type(value, struct slot_list);
} exact SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_RULES);
	__type(key, __u32);
	__type(value, struct slot_list);
} by_dport SEC(".maps");

/* Each prefix holds every rule whose destination prefix covers it: the longest match
 * then yields all rules whose prefix contains the address (nested prefixes). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_RULES);
	__type(key, struct lpm_key);
	__type(value, struct slot_list);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} by_prefix SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct slot_list);
} general SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_RULES);
	__type(key, __u32);
	__type(value, struct counter);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, S_NSTATS);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, MAX_RULES);
	__type(key, __u32);
	__type(value, __u64);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct group);
} groups SEC(".maps");

/* A redirected packet's original destination by its source, for boxd: the booster's socket
 * only learns the source, and a pass / modify verdict re-sends the packet onward. */
struct flow_key {
	__u32 saddr;         /* network byte order */
	__u16 sport;         /* host order */
	__u16 pad;
};

struct flow_dst {
	__u32 daddr;
	__u16 dport;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct flow_dst);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} copies SEC(".maps");

static __always_inline void count_stat(__u32 which)
{
	__u64 *value = bpf_map_lookup_elem(&stats, &which);
	if (value)
		*value += 1;
}

/* What the classifier needs of a packet (boxcore.packet.Packet's fields). */
struct pktinfo {
	__u32 src, dst;          /* network byte order */
	__u16 sport, dport;      /* host order; 0 without ports */
	__u32 l3_off;            /* offset of the IPv4 header in the frame */
	__u32 payload_off;       /* offset of the transport payload in the frame */
	__u32 payload_len;
	__u32 ip_len;            /* IPv4 total length */
	__u8 proto;
	__u8 pad[3];
};

/* Does rule `slot` match?  0 no, 1 yes; *rule_out is set on a match.  A global function:
 * verified once, whatever the number of call sites. */
__noinline int match_slot(struct xdp_md *ctx, struct pktinfo *p, __u32 slot, __u64 *order,
			  __u32 *action)
{
	struct rule *r;
	__u8 buf[8];
	int i;

	if (!ctx || !p || !order || !action)
		return 0;
	r = bpf_map_lookup_elem(&rules, &slot);
	if (!r || r->action == A_NONE)
		return 0;
	if ((r->flags & F_PROTO) && r->proto != p->proto)
		return 0;
	if (p->dport < r->dport_lo || p->dport > r->dport_hi)
		return 0;
	if (p->sport < r->sport_lo || p->sport > r->sport_hi)
		return 0;
	if ((r->flags & F_DST) && (p->dst & r->dst_mask) != r->dst_net)
		return 0;
	if ((r->flags & F_SRC) && (p->src & r->src_mask) != r->src_net)
		return 0;
	if (r->payload_end) {
		if (p->payload_len < r->payload_end)
			return 0;
		for (i = 0; i < MAX_CHUNKS; i++) {
			struct chunk *c = &r->chunks[i];
			__u64 len = c->len;
			__u32 off = c->offset;
			__u64 got = 0, value, mask;

			if (i >= r->nchunks)
				break;
			barrier_var(len);
			if (len < 1 || len > 8 || off > MAX_PAYLOAD_OFFSET)
				return 0;
			__builtin_memset(buf, 0, sizeof(buf));
			if (bpf_xdp_load_bytes(ctx, p->payload_off + off, buf, len))
				return 0;
			__builtin_memcpy(&got, buf, 8);
			__builtin_memcpy(&value, c->value, 8);
			__builtin_memcpy(&mask, c->mask, 8);
			if ((got & mask) != value)
				return 0;
		}
	}
	*order = r->order;
	*action = r->action;
	return 1;
}

struct decision {
	__u32 best;              /* slot of the winning terminal rule, or ~0 */
	__u64 best_order;
	__u32 ncopies;
	__u32 copies[MAX_COPIES];
};

enum list_kind { L_EXACT, L_DPORT, L_PREFIX, L_GENERAL };

/* Scan one candidate list into *d.  Global (verified once, with *d unknown memory), so the
 * four lists and their 32 entries do not multiply the verifier's paths. */
__noinline int scan(struct xdp_md *ctx, struct pktinfo *p, struct decision *d, __u32 kind)
{
	struct slot_list *list = 0;
	__u32 i, n, zero = 0;

	if (!ctx || !p || !d)
		return 0;
	if (kind == L_EXACT) {
		struct exact_key key = { .src = p->src, .dst = p->dst, .sport = p->sport,
					 .dport = p->dport, .proto = p->proto };
		list = bpf_map_lookup_elem(&exact, &key);
	} else if (kind == L_DPORT) {
		__u32 port = p->dport;
		list = bpf_map_lookup_elem(&by_dport, &port);
	} else if (kind == L_PREFIX) {
		struct lpm_key key = { .prefixlen = 32, .addr = p->dst };
		list = bpf_map_lookup_elem(&by_prefix, &key);
	} else {
		list = bpf_map_lookup_elem(&general, &zero);
	}
	if (!list)
		return 0;
	n = list->n;
	for (i = 0; i < BUCKET; i++) {
		__u32 slot, action = 0;
		__u64 order = 0;

		if (i >= n)
			break;
		slot = list->slot[i];
		if (!match_slot(ctx, p, slot, &order, &action))
			continue;
		if (action == A_COPY) {
			__u32 k = d->ncopies;
			if (k < MAX_COPIES) {
				d->copies[k] = slot;
				d->ncopies = k + 1;
			}
		} else if (order < d->best_order) {
			d->best = slot;
			d->best_order = order;
		}
	}
	return 0;
}

static __always_inline void count_rule(__u32 slot, __u32 bytes)
{
	struct counter *c = bpf_map_lookup_elem(&counters, &slot);
	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

static __always_inline void send_copy(struct xdp_md *ctx, struct pktinfo *p, __u32 slot)
{
	struct rule *r = bpf_map_lookup_elem(&rules, &slot);
	struct copy_rec *rec;
	__u64 len = p->ip_len;   /* 64-bit: clang would bound a 32-bit copy and pass the other */

	if (!r)
		return;
	rec = bpf_ringbuf_reserve(&copies, sizeof(*rec), 0);
	if (!rec) {
		count_stat(S_COPY_LOST);
		return;
	}
	if (len > COPY_SNAP)
		len = COPY_SNAP;
	barrier_var(len);
	if (len < 20 || len > COPY_SNAP) {
		bpf_ringbuf_discard(rec, 0);
		return;
	}
	rec->cookie = r->cookie;
	rec->wire_len = p->ip_len;
	if (bpf_xdp_load_bytes(ctx, p->l3_off, rec->data, len)) {
		bpf_ringbuf_discard(rec, 0);
		count_stat(S_COPY_LOST);
		return;
	}
	rec->len = len;
	bpf_ringbuf_submit(rec, 0);
}

SEC("xdp")
int boxd_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct pktinfo p = {};
	struct decision d = {};
	struct config *cfg;
	__u32 zero = 0, hlen, body_len, frag, i;
	int expired;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
		return XDP_PASS;
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return XDP_PASS;
	/* boxd gone (lease not renewed): pass everything no live socket claims */
	expired = bpf_ktime_get_ns() > cfg->lease_until_ns;
	hlen = ip->ihl * 4;
	p.ip_len = bpf_ntohs(ip->tot_len);
	if (p.ip_len < hlen || (void *)ip + p.ip_len > data_end)
		return XDP_PASS;      /* malformed (or a GRO super-packet): not ours to judge */
	p.l3_off = sizeof(*eth);
	p.src = ip->saddr;
	p.dst = ip->daddr;
	p.proto = ip->protocol;
	body_len = p.ip_len - hlen;
	p.payload_off = p.l3_off + hlen;
	p.payload_len = body_len;
	frag = bpf_ntohs(ip->frag_off);
	/* a non-first fragment carries no transport header: no ports, the body is the payload */
	if (!(frag & 0x1fff)) {
		if (p.proto == IPPROTO_UDP) {
			__u16 *udp = (void *)ip + hlen;
			__u32 ulen;

			if (body_len < 8 || (void *)(udp + 4) > data_end)
				return XDP_PASS;
			p.sport = bpf_ntohs(udp[0]);
			p.dport = bpf_ntohs(udp[1]);
			ulen = bpf_ntohs(udp[2]);
			p.payload_off += 8;
			if (frag & 0x2000) {           /* first fragment: the rest of the body */
				p.payload_len = body_len - 8;
			} else {
				if (ulen < 8 || ulen > body_len)
					return XDP_PASS;
				p.payload_len = ulen - 8;
			}
		} else if (p.proto == IPPROTO_TCP) {
			__u8 *tcp = (void *)ip + hlen;
			__u32 doff;

			if (body_len < 20 || (void *)(tcp + 20) > data_end)
				return XDP_PASS;
			p.sport = bpf_ntohs(*(__u16 *)tcp);
			p.dport = bpf_ntohs(*(__u16 *)(tcp + 2));
			doff = (tcp[12] >> 4) * 4;
			if (doff < 20 || doff > body_len)
				return XDP_PASS;
			p.payload_off += doff;
			p.payload_len = body_len - doff;
		}
	}
	count_stat(S_PACKETS);

	d.best = ~0u;
	d.best_order = ~0ull;
	scan(ctx, &p, &d, L_EXACT);
	scan(ctx, &p, &d, L_DPORT);
	scan(ctx, &p, &d, L_PREFIX);
	scan(ctx, &p, &d, L_GENERAL);

	if (expired) {
		count_stat(S_LEASE_EXPIRED);
		d.ncopies = 0;
	}
	for (i = 0; i < MAX_COPIES; i++) {
		if (i >= d.ncopies)
			break;
		count_rule(d.copies[i], p.payload_len);
		send_copy(ctx, &p, d.copies[i]);
	}
	if (d.best == ~0u)
		return XDP_PASS;
	{
		struct rule *r = bpf_map_lookup_elem(&rules, &d.best);
		struct meta *meta;

		if (!r)
			return XDP_PASS;
		if (expired && r->action != A_REDIRECT && r->action != A_INTERCEPT)
			return XDP_PASS;
		count_rule(d.best, p.payload_len);
		switch (r->action) {
		case A_DROP:
			return XDP_DROP;
		case A_REDIRECT:
		case A_INTERCEPT:
		case A_MULTICAST:
			if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(*meta)))
				return XDP_PASS;
			meta = (void *)(long)ctx->data_meta;
			if ((void *)(meta + 1) > (void *)(long)ctx->data)
				return XDP_PASS;
			meta->magic = META_MAGIC;
			meta->slot = d.best;
			return XDP_PASS;
		default:
			return XDP_PASS;
		}
	}
}

/* ------------------------------------------------------------------ tc */

#define IP_CSUM_OFF (ETH_HLEN + 10)
#define IP_TTL_OFF (ETH_HLEN + 8)
#define IP_DST_OFF (ETH_HLEN + 16)

static __always_inline int fan_out(struct __sk_buff *skb, __u32 group_id)
{
	struct group *g = bpf_map_lookup_elem(&groups, &group_id);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__u32 i, n, hlen, cur_addr, l4_csum_off = 0, port_off = 0;
	__u16 cur_port = 0, old_ttl_word, new_ttl_word;
	__u8 proto;

	if (!g) {
		count_stat(S_NO_GROUP);
		return TC_ACT_SHOT;
	}
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_SHOT;
	hlen = ip->ihl * 4;
	proto = ip->protocol;
	cur_addr = ip->daddr;
	if (proto == IPPROTO_UDP) {
		__u16 *udp = (void *)ip + hlen;
		if ((void *)(udp + 4) > data_end)
			return TC_ACT_SHOT;
		cur_port = udp[1];
		port_off = ETH_HLEN + hlen + 2;
		l4_csum_off = ETH_HLEN + hlen + 6;
	}
	/* TTL - 1 once, as a router would */
	old_ttl_word = *(__u16 *)((void *)ip + 8);
	if (ip->ttl <= 1)
		return TC_ACT_SHOT;
	{
		__u8 ttl = ip->ttl - 1;
		bpf_skb_store_bytes(skb, IP_TTL_OFF, &ttl, 1, 0);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + ETH_HLEN + 10 > data_end)
			return TC_ACT_SHOT;
		new_ttl_word = *(__u16 *)(data + ETH_HLEN + 8);
		bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ttl_word, new_ttl_word, 2);
	}
	n = g->n;
	for (i = 0; i < MAX_MEMBERS; i++) {
		struct bpf_fib_lookup fib = {};
		struct member *m;
		int rc;

		if (i >= n)
			break;
		m = &g->m[i];
		if (m->addr != cur_addr) {
			bpf_l3_csum_replace(skb, IP_CSUM_OFF, cur_addr, m->addr, 4);
			if (l4_csum_off)
				bpf_l4_csum_replace(skb, l4_csum_off, cur_addr, m->addr,
						    BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4);
			bpf_skb_store_bytes(skb, IP_DST_OFF, &m->addr, 4, 0);
			cur_addr = m->addr;
		}
		if (port_off && m->port != cur_port) {
			bpf_l4_csum_replace(skb, l4_csum_off, cur_port, m->port, BPF_F_MARK_MANGLED_0 | 2);
			bpf_skb_store_bytes(skb, port_off, &m->port, 2, 0);
			cur_port = m->port;
		}
		fib.family = 2; /* AF_INET */
		fib.ifindex = skb->ingress_ifindex;
		fib.ipv4_dst = m->addr;
		fib.l4_protocol = proto;
		fib.tot_len = skb->len - ETH_HLEN;
		rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
		if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
			count_stat(S_NO_NEIGH);
			continue;
		}
		if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
			count_stat(S_FANOUT_FAILED);
			continue;
		}
		bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0);
		bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0);
		if (bpf_clone_redirect(skb, fib.ifindex, 0))
			count_stat(S_FANOUT_FAILED);
		else
			count_stat(S_FANOUT_OUT);
	}
	return TC_ACT_SHOT;       /* the original is replaced by its copies */
}

/* Hand the packet to ``sk`` (a reference this takes over) and mark it for local delivery; the
 * packet goes on untouched if the kernel refuses. */
static __always_inline int assign_to(struct __sk_buff *skb, struct bpf_sock *sk, struct config *cfg, __u32 done)
{
	long err = bpf_sk_assign(skb, sk, 0);

	bpf_sk_release(sk);
	if (err) {
		count_stat(S_ASSIGN_FAILED);
		return TC_ACT_OK;
	}
	skb->mark = cfg->mark;
	count_stat(done);
	return TC_ACT_OK;
}

/* The IPv4 4-tuple of the packet (no IP options) for a socket look-up; non-zero if it has none. */
static __always_inline int tcp_tuple(void *data, void *data_end, struct bpf_sock_tuple *tuple)
{
	struct iphdr *ip = data + ETH_HLEN;
	__u16 *ports;

	if ((void *)(ip + 1) > data_end || ip->ihl != 5)
		return -1;
	ports = (void *)(ip + 1);
	if ((void *)(ports + 2) > data_end)
		return -1;
	tuple->ipv4.saddr = ip->saddr;
	tuple->ipv4.daddr = ip->daddr;
	tuple->ipv4.sport = ports[0];
	tuple->ipv4.dport = ports[1];
	return 0;
}

/* The server's replies to a booster's onward connection that spoofs the client
 * (connect_onward(spoof_client=True)): addressed to the client, they would be forwarded to it;
 * the booster's own transparent socket holds that 4-tuple, so they are handed to it, as the
 * linux engine's TPROXY socket match does.  Only while TCP interception is installed. */
static __always_inline int steer_reply(struct __sk_buff *skb, struct config *cfg)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip->protocol != IPPROTO_TCP || tcp_tuple(data, data_end, &tuple))
		return TC_ACT_OK;
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return TC_ACT_OK;
	/* a connection's own socket only: not a listener, not a TIME_WAIT mini-socket */
	if (sk->state == 10 /* TCP_LISTEN */ || sk->state == 6 /* TCP_TIME_WAIT */) {
		bpf_sk_release(sk);
		return TC_ACT_OK;
	}
	return assign_to(skb, sk, cfg, S_REPLY_STEERED);
}

SEC("tc")
int boxd_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct meta *meta = (void *)(long)skb->data_meta;
	struct config *cfg;
	struct rule *r;
	__u32 zero = 0, slot;

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return TC_ACT_OK;
	if (cfg->mcast_ifindex && skb->ingress_ifindex == cfg->mcast_ifindex) {
		/* boxd's send_multicast: the group rides in the destination MAC 02:bb:g3:g2:g1:g0 */
		struct ethhdr *eth = data;
		__u32 group;

		if ((void *)(eth + 1) > data_end || eth->h_dest[0] != 0x02 || eth->h_dest[1] != 0xbb)
			return TC_ACT_SHOT;
		group = ((__u32)eth->h_dest[2] << 24) | ((__u32)eth->h_dest[3] << 16) |
			((__u32)eth->h_dest[4] << 8) | eth->h_dest[5];
		return fan_out(skb, group);
	}
	if ((void *)(meta + 1) > data || meta->magic != META_MAGIC) {
		if (cfg->steer_replies)
			return steer_reply(skb, cfg);
		return TC_ACT_OK;
	}
	slot = meta->slot;
	r = bpf_map_lookup_elem(&rules, &slot);
	if (!r)
		return TC_ACT_OK;
	if (r->action == A_MULTICAST)
		return fan_out(skb, r->group);
	if (r->action == A_REDIRECT) {
		struct iphdr *ip = data + ETH_HLEN;
		struct bpf_sock *sk;
		__u16 *ports;

		/* the booster's socket is a UDP socket: other protocols go on */
		if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_UDP)
			return TC_ACT_OK;
		ports = (void *)ip + ip->ihl * 4;
		if ((void *)(ports + 2) > data_end)
			return TC_ACT_OK;
		{
			struct flow_key key = { .saddr = ip->saddr, .sport = bpf_ntohs(ports[0]) };
			struct flow_dst dst = { .daddr = ip->daddr, .dport = bpf_ntohs(ports[1]) };

			bpf_map_update_elem(&flows, &key, &dst, BPF_ANY);
		}
		sk = bpf_map_lookup_elem(&socks, &slot);
		if (!sk) {
			count_stat(S_NO_SOCKET);   /* its booster is gone: the packet goes on */
			return TC_ACT_OK;
		}
		return assign_to(skb, sk, cfg, S_ASSIGNED);
	}
	if (r->action == A_INTERCEPT) {
		/* TCP interception as TPROXY does: a connection's own (transparent) socket first,
		 * else the booster's listener on 0.0.0.0:port, found by the kernel's lookup. */
		struct bpf_sock_tuple tuple = {};
		struct bpf_sock *sk;

		if (tcp_tuple(data, data_end, &tuple))
			return TC_ACT_OK;
		sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
		if (sk) {
			if (sk->state != 10 /* TCP_LISTEN */)
				goto assign;
			bpf_sk_release(sk);
		}
		tuple.ipv4.daddr = bpf_htonl(0x7f000001);
		tuple.ipv4.dport = bpf_htons((__u16)r->group);  /* the listener's port */
		sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
		if (!sk) {
			count_stat(S_NO_SOCKET);
			return TC_ACT_OK;
		}
		if (sk->state != 10) {
			bpf_sk_release(sk);
			count_stat(S_NO_SOCKET);
			return TC_ACT_OK;
		}
assign:
		return assign_to(skb, sk, cfg, S_ASSIGNED);
	}
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
