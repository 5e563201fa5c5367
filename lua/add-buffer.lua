--[[
add-buffer.lua: merge one subsegment (spans of one project and trace that share a parent)
into the segment it belongs to, and return where it went.

The payload bytes are not touched here: the client has already written them (SADD) to the
subsegment's payload key `span-buf:s:{<pt>:<salt>}:<salt>`. This script only maintains the
segment bookkeeping, so it stays cheap and atomic within the `{<pt>}` cluster slot.

KEYS[1]   pt = "<project_id>:<trace_id>"; every key below carries the hash tag "{<pt>}",
          either directly or inside an embedded segment key, so one slot is touched.
ARGV[1]   num_spans            integer, spans in this subsegment
ARGV[2]   parent_span_id       common parent of the subsegment (the root's own id if present)
ARGV[3]   has_root_span        "true" | "false"
ARGV[4]   set_timeout          integer seconds; TTL (re)set on every key written
ARGV[5]   byte_count           integer, sum of the uncompressed payload lengths
ARGV[6]   max_segment_bytes    integer, 0 = unlimited; over it the subsegment detaches
ARGV[7]   salt                 32 hex chars, names the payload key; detached segments use it
ARGV[8]   check_flush_lock     "true" | "false"; detach when the target is being flushed
ARGV[9]   metrics_sample_rate  integer N: metrics are gathered for about 1 call in N
ARGV[10..] span ids of the subsegment

RETURNS   { segment_key,             "span-buf:s:{<pt>}:<root span id or salt>"
            has_root_span,           1 or nil
            latency_us,              total microseconds, -1 when not sampled
            latency_table,           flat { name, value, ... } ({} when not sampled)
            metrics_table,           flat { name, value, ... } ({} when not sampled)
            merged_segment_span_ids  span ids whose own segment was merged into this one }

Key shapes must match spans-pipeline/src/buffer/keys.rs.
]]

local project_and_trace = KEYS[1]
local num_spans = tonumber(ARGV[1])
local parent_span_id = ARGV[2]
local has_root_span = ARGV[3] == "true"
local set_timeout = tonumber(ARGV[4])
local byte_count = tonumber(ARGV[5])
local max_segment_bytes = tonumber(ARGV[6])
local salt = ARGV[7]
local check_flush_lock = ARGV[8] == "true"
local metrics_sample_rate = tonumber(ARGV[9]) or 1
local FIRST_SPAN_ARG = 10

-- Lua's unpack() fails beyond a few thousand values, so variadic commands are chunked.
local CHUNK = 1000
-- Redirect chains are short in practice (depth 2); the bound keeps a corrupt map from looping.
local MAX_REDIRECT_DEPTH = 100
-- SSCAN page size when moving one member-keys index into another.
local MERGE_PAGE = 1000

local tag = "{" .. project_and_trace .. "}"
local redirect_key = "span-buf:ssr:" .. tag

local function segment_key_of(span_id)
    return "span-buf:s:" .. tag .. ":" .. span_id
end

local function member_keys_of(span_id)
    return "span-buf:mk:" .. tag .. ":" .. span_id
end

-- Sampling without a TIME call: the salt is a hash, so its first digits are uniform. Any
-- salt that is not hex (direct script tests) is sampled only when the rate is 1.
local sampled = metrics_sample_rate <= 1
if not sampled then
    local prefix = tonumber(string.sub(salt, 1, 8), 16)
    sampled = prefix ~= nil and prefix % metrics_sample_rate == 0
end

local function now_us()
    local t = redis.call("TIME")
    return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local start_us = 0
if sampled then
    start_us = now_us()
end

-- Follow the redirect map to the best known segment root of the parent.
local set_span_id = parent_span_id
local redirect_depth = 0
for depth = 1, MAX_REDIRECT_DEPTH do
    local next_id = redis.call("HGET", redirect_key, set_span_id)
    if not next_id or next_id == set_span_id then
        break
    end
    set_span_id = next_id
    redirect_depth = depth
end
local set_key = segment_key_of(set_span_id)

local redirect_done_us = 0
if sampled then
    redirect_done_us = now_us()
end

-- Remember that the segment has seen its root (before any detach decision, like Sentry).
local root_flag_key = "span-buf:hrs:" .. set_key
if not has_root_span then
    has_root_span = redis.call("GET", root_flag_key) == "1"
end
if has_root_span then
    redis.call("SETEX", root_flag_key, set_timeout, "1")
end

-- Point every span of the subsegment at the (pre-detach) segment root.
local span_count = #ARGV - FIRST_SPAN_ARG + 1
for first = FIRST_SPAN_ARG, #ARGV, CHUNK do
    local fields = {}
    for i = first, math.min(first + CHUNK - 1, #ARGV) do
        fields[#fields + 1] = ARGV[i]
        fields[#fields + 1] = set_span_id
    end
    redis.call("HSET", redirect_key, unpack(fields))
end
redis.call("EXPIRE", redirect_key, set_timeout)

-- Spans of this subsegment may have been segment roots before: their counters come along.
local children = {}
for i = FIRST_SPAN_ARG, #ARGV do
    local span_id = ARGV[i]
    if span_id ~= parent_span_id and span_id ~= set_span_id then
        children[#children + 1] = span_id
    end
end
local child_counts = {}
local child_bytes = {}
for first = 1, #children, CHUNK do
    local last = math.min(first + CHUNK - 1, #children)
    local count_keys = {}
    local byte_keys = {}
    for i = first, last do
        local child_segment = segment_key_of(children[i])
        count_keys[#count_keys + 1] = "span-buf:ic:" .. child_segment
        byte_keys[#byte_keys + 1] = "span-buf:ibc:" .. child_segment
    end
    local counts = redis.call("MGET", unpack(count_keys))
    local bytes = redis.call("MGET", unpack(byte_keys))
    for i = first, last do
        child_counts[i] = counts[i - first + 1]
        child_bytes[i] = bytes[i - first + 1]
    end
end
for i = 1, #children do
    if child_bytes[i] then
        byte_count = byte_count + tonumber(child_bytes[i])
    end
end

-- Detach into a segment of its own when the target is too big or is being flushed. No
-- payload moves: the payload key is already named by the salt.
local ingested_byte_count = tonumber(redis.call("GET", "span-buf:ibc:" .. set_key) or "0")
local too_large = max_segment_bytes > 0 and ingested_byte_count + byte_count > max_segment_bytes
local locked = check_flush_lock and redis.call("EXISTS", "span-buf:fl:" .. set_key) == 1
if too_large or locked then
    set_span_id = salt
    set_key = segment_key_of(salt)
end

local counter_key = "span-buf:ic:" .. set_key
local byte_counter_key = "span-buf:ibc:" .. set_key
local member_keys_key = member_keys_of(set_span_id)

-- Merge the segments of former roots into this one: counters, then their member-keys index
-- (paged with SSCAN rather than SUNIONSTORE, because the target can be huge).
local merged_segment_span_ids = {}
local merge_start_us = 0
if sampled then
    merge_start_us = now_us()
end
for i = 1, #children do
    local child_segment = segment_key_of(children[i])
    if child_counts[i] then
        redis.call("INCRBY", counter_key, child_counts[i])
        redis.call("DEL", "span-buf:ic:" .. child_segment)
    end
    if child_bytes[i] then
        redis.call("DEL", "span-buf:ibc:" .. child_segment)
    end
    if child_counts[i] then
        local child_member_keys = member_keys_of(children[i])
        local cursor = "0"
        repeat
            local page = redis.call("SSCAN", child_member_keys, cursor, "COUNT", MERGE_PAGE)
            cursor = page[1]
            local members = page[2]
            for first = 1, #members, CHUNK do
                redis.call("SADD", member_keys_key,
                    unpack(members, first, math.min(first + CHUNK - 1, #members)))
            end
        until cursor == "0"
        redis.call("DEL", child_member_keys)
        merged_segment_span_ids[#merged_segment_span_ids + 1] = children[i]
    end
end
local merge_done_us = 0
if sampled then
    merge_done_us = now_us()
end

redis.call("SADD", member_keys_key, salt)
redis.call("EXPIRE", member_keys_key, set_timeout)

redis.call("INCRBY", counter_key, num_spans)
redis.call("EXPIRE", counter_key, set_timeout)
redis.call("INCRBY", byte_counter_key, byte_count)
redis.call("EXPIRE", byte_counter_key, set_timeout)

local latency_us = -1
local latency_table = {}
local metrics_table = {}
if sampled then
    local end_us = now_us()
    latency_us = end_us - start_us
    latency_table = {
        "redirect_step_latency_us", redirect_done_us - start_us,
        "merge_payload_keys_step_latency_us", merge_done_us - merge_start_us,
        "counter_merge_step_latency_us", end_us - merge_done_us,
        "total_step_latency_us", latency_us,
    }
    metrics_table = {
        "redirect_table_size", redis.call("HLEN", redirect_key),
        "redirect_depth", redirect_depth,
        "detached_segment_too_large", too_large and 1 or 0,
        "detached_segment_locked", locked and 1 or 0,
        "span_count", span_count,
    }
end

return { set_key, has_root_span, latency_us, latency_table, metrics_table, merged_segment_span_ids }
