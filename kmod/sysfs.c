// SPDX-License-Identifier: GPL-2.0
/*
 * sysfs.c - /sys/kernel/qwen3mm: the pool's counters (whole and per node),
 * the per-node pool size, and the knobs qwen3d reads at start.  The layout is
 * documented in qwen3mm_uapi.h.  Every write is parsed and range-checked
 * before anything changes; bad input gets -EINVAL and changes nothing.
 *
 * The directory exists before /dev/qwen3mm is registered, so a udev rule
 * run for the device always finds it.
 */
#include <linux/kernel.h>
#include <linux/kobject.h>
#include <linux/log2.h>
#include <linux/nodemask.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/sysfs.h>

#include "qwen3mm.h"

static struct kobject *q3mm_kobj;	/* /sys/kernel/qwen3mm */
static struct kobject *q3mm_knobs_kobj;	/* .../knobs */
static struct kobject **q3mm_node_kobjs;	/* .../node<N>, [nr_node_ids] */

/* ---- counters ---------------------------------------------------------- */

enum q3mm_stat_field { Q3MM_TOTAL, Q3MM_FREE, Q3MM_USED, Q3MM_HELD, Q3MM_PEAK, Q3MM_FAILURES };

struct q3mm_stat_attr {
	struct kobj_attribute attr;
	enum q3mm_stat_field field;
};

/* NUMA_NO_NODE for the top directory, else the N of node<N> */
static int q3mm_kobj_nid(struct kobject *kobj)
{
	int nid;

	if (kobj == q3mm_kobj || kstrtoint(kobject_name(kobj) + strlen("node"), 10, &nid))
		return NUMA_NO_NODE;
	return nid;
}

static ssize_t q3mm_stat_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct q3mm_stat_attr *sa = container_of(attr, struct q3mm_stat_attr, attr);
	struct q3mm_stats st;
	unsigned long chunks;

	q3mm_pool_stats(q3mm_kobj_nid(kobj), &st);
	switch (sa->field) {
	case Q3MM_TOTAL:
		chunks = st.total;
		break;
	case Q3MM_FREE:
		chunks = st.free;
		break;
	case Q3MM_USED:
		chunks = st.used;
		break;
	case Q3MM_HELD:
		chunks = st.held;
		break;
	case Q3MM_PEAK:
		chunks = st.peak;
		break;
	default:
		return sysfs_emit(buf, "%lu\n", st.failures);
	}
	return sysfs_emit(buf, "%llu\n", (u64)chunks << QWEN3MM_CHUNK_SHIFT);
}

#define Q3MM_STAT(_var, _name, _field) \
	static struct q3mm_stat_attr _var = { \
		.attr = __ATTR(_name, 0444, q3mm_stat_show, NULL), \
		.field = _field, \
	}

Q3MM_STAT(q3mm_total_attr, total_bytes, Q3MM_TOTAL);
Q3MM_STAT(q3mm_free_attr, free_bytes, Q3MM_FREE);
Q3MM_STAT(q3mm_used_attr, used_bytes, Q3MM_USED);
Q3MM_STAT(q3mm_held_attr, held_bytes, Q3MM_HELD);
Q3MM_STAT(q3mm_peak_attr, peak_bytes, Q3MM_PEAK);
Q3MM_STAT(q3mm_failures_attr, alloc_failures, Q3MM_FAILURES);

static ssize_t version_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%d.%d\n", QWEN3MM_VERSION_MAJOR, QWEN3MM_VERSION_MINOR);
}
static struct kobj_attribute q3mm_version_attr = __ATTR_RO(version);

static ssize_t buffers_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%ld\n", q3mm_buf_count());
}
static struct kobj_attribute q3mm_buffers_attr = __ATTR_RO(buffers);

static ssize_t pool_mb_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct q3mm_stats st;

	q3mm_pool_stats(q3mm_kobj_nid(kobj), &st);
	return sysfs_emit(buf, "%lu\n", st.total * Q3MM_CHUNK_MB);
}

static ssize_t pool_mb_store(struct kobject *kobj, struct kobj_attribute *attr,
			     const char *buf, size_t count)
{
	unsigned long mb;
	int ret;

	if (kstrtoul(buf, 10, &mb))
		return -EINVAL;
	ret = q3mm_pool_resize(q3mm_kobj_nid(kobj), q3mm_mb_to_chunks(mb));
	return ret ? ret : count;
}
static struct kobj_attribute q3mm_pool_mb_attr = __ATTR_RW(pool_mb);

/* the counters, in the top directory and in each node<N> */
static struct attribute *q3mm_stat_attrs[] = {
	&q3mm_total_attr.attr.attr,
	&q3mm_free_attr.attr.attr,
	&q3mm_used_attr.attr.attr,
	&q3mm_held_attr.attr.attr,
	&q3mm_peak_attr.attr.attr,
	&q3mm_failures_attr.attr.attr,
	NULL,
};

static const struct attribute_group q3mm_stat_group = {
	.attrs = q3mm_stat_attrs,
};

static struct attribute *q3mm_top_attrs[] = {
	&q3mm_version_attr.attr,
	&q3mm_buffers_attr.attr,
	NULL,
};

static const struct attribute_group q3mm_top_group = {
	.attrs = q3mm_top_attrs,
};

static const struct attribute_group *q3mm_top_groups[] = {
	&q3mm_stat_group,
	&q3mm_top_group,
	NULL,
};

static struct attribute *q3mm_node_attrs[] = {
	&q3mm_pool_mb_attr.attr,
	NULL,
};

static const struct attribute_group q3mm_node_group = {
	.attrs = q3mm_node_attrs,
};

static const struct attribute_group *q3mm_node_groups[] = {
	&q3mm_stat_group,
	&q3mm_node_group,
	NULL,
};

/* ---- knobs ------------------------------------------------------------- */

struct q3mm_knob {
	struct kobj_attribute attr;
	u32 value;
	u32 min;
	u32 max;
	bool pow2;	/* value must be a power of two */
};

static ssize_t q3mm_knob_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	struct q3mm_knob *k = container_of(attr, struct q3mm_knob, attr);

	return sysfs_emit(buf, "%u\n", READ_ONCE(k->value));
}

static ssize_t q3mm_knob_store(struct kobject *kobj, struct kobj_attribute *attr,
			       const char *buf, size_t count)
{
	struct q3mm_knob *k = container_of(attr, struct q3mm_knob, attr);
	u32 v;

	if (kstrtou32(buf, 10, &v) || v < k->min || v > k->max || (k->pow2 && !is_power_of_2(v)))
		return -EINVAL;
	WRITE_ONCE(k->value, v);
	return count;
}

#define Q3MM_KNOB(_name, _def, _min, _max, _pow2) \
	static struct q3mm_knob q3mm_knob_##_name = { \
		.attr = __ATTR(_name, 0644, q3mm_knob_show, q3mm_knob_store), \
		.value = _def, \
		.min = _min, \
		.max = _max, \
		.pow2 = _pow2, \
	}

Q3MM_KNOB(read_chunk_kb, QWEN3MM_KNOB_READ_CHUNK_KB_DEFAULT,
	  QWEN3MM_KNOB_READ_CHUNK_KB_MIN, QWEN3MM_KNOB_READ_CHUNK_KB_MAX, true);
Q3MM_KNOB(queue_depth, QWEN3MM_KNOB_QUEUE_DEPTH_DEFAULT,
	  QWEN3MM_KNOB_QUEUE_DEPTH_MIN, QWEN3MM_KNOB_QUEUE_DEPTH_MAX, false);
Q3MM_KNOB(vram_budget_mb, QWEN3MM_KNOB_VRAM_BUDGET_MB_DEFAULT,
	  0, QWEN3MM_KNOB_VRAM_BUDGET_MB_MAX, false);
Q3MM_KNOB(cpu_expert_threads, QWEN3MM_KNOB_CPU_EXPERT_THREADS_DEFAULT,
	  0, QWEN3MM_KNOB_CPU_EXPERT_THREADS_MAX, false);

static const char * const q3mm_policy_names[] = QWEN3MM_POLICY_NAMES;
static int q3mm_policy = QWEN3MM_POLICY_DEFAULT;

static ssize_t expert_cache_policy_show(struct kobject *kobj, struct kobj_attribute *attr,
					char *buf)
{
	int cur = READ_ONCE(q3mm_policy);
	ssize_t len = 0;
	int i;

	for (i = 0; i < ARRAY_SIZE(q3mm_policy_names); i++)
		len += sysfs_emit_at(buf, len, i == cur ? "%s[%s]" : "%s%s", i ? " " : "",
				     q3mm_policy_names[i]);
	return len + sysfs_emit_at(buf, len, "\n");
}

static ssize_t expert_cache_policy_store(struct kobject *kobj, struct kobj_attribute *attr,
					 const char *buf, size_t count)
{
	int i = sysfs_match_string(q3mm_policy_names, buf);

	if (i < 0)
		return -EINVAL;
	WRITE_ONCE(q3mm_policy, i);
	return count;
}
static struct kobj_attribute q3mm_policy_attr = __ATTR_RW(expert_cache_policy);

static struct attribute *q3mm_knob_attrs[] = {
	&q3mm_knob_read_chunk_kb.attr.attr,
	&q3mm_knob_queue_depth.attr.attr,
	&q3mm_knob_vram_budget_mb.attr.attr,
	&q3mm_policy_attr.attr,
	&q3mm_knob_cpu_expert_threads.attr.attr,
	NULL,
};

static const struct attribute_group q3mm_knob_group = {
	.attrs = q3mm_knob_attrs,
};

static const struct attribute_group *q3mm_knob_groups[] = {
	&q3mm_knob_group,
	NULL,
};

/* ---- directories ------------------------------------------------------- */

static struct kobject *q3mm_dir_create(const char *name, struct kobject *parent,
				       const struct attribute_group **groups)
{
	struct kobject *kobj = kobject_create_and_add(name, parent);

	if (!kobj)
		return NULL;
	if (sysfs_create_groups(kobj, groups)) {
		kobject_put(kobj);
		return NULL;
	}
	return kobj;
}

int q3mm_sysfs_init(void)
{
	char name[16];
	int nid;

	q3mm_node_kobjs = kcalloc(nr_node_ids, sizeof(*q3mm_node_kobjs), GFP_KERNEL);
	if (!q3mm_node_kobjs)
		return -ENOMEM;
	q3mm_kobj = q3mm_dir_create("qwen3mm", kernel_kobj, q3mm_top_groups);
	if (!q3mm_kobj)
		goto out_err;
	q3mm_knobs_kobj = q3mm_dir_create("knobs", q3mm_kobj, q3mm_knob_groups);
	if (!q3mm_knobs_kobj)
		goto out_err;
	for (nid = 0; nid < nr_node_ids; nid++) {
		if (!q3mm_pool_has_node(nid))
			continue;
		snprintf(name, sizeof(name), "node%d", nid);
		q3mm_node_kobjs[nid] = q3mm_dir_create(name, q3mm_kobj, q3mm_node_groups);
		if (!q3mm_node_kobjs[nid])
			goto out_err;
	}
	return 0;

out_err:
	q3mm_sysfs_exit();
	return -ENOMEM;
}

void q3mm_sysfs_exit(void)
{
	int nid;

	for (nid = 0; q3mm_node_kobjs && nid < nr_node_ids; nid++)
		kobject_put(q3mm_node_kobjs[nid]);
	kfree(q3mm_node_kobjs);
	q3mm_node_kobjs = NULL;
	kobject_put(q3mm_knobs_kobj);
	q3mm_knobs_kobj = NULL;
	kobject_put(q3mm_kobj);
	q3mm_kobj = NULL;
}
