// openai_client.mjs - qwen3d through the official OpenAI Node client: models, chat, streaming,
// completions, a tool-call round trip and errors.  Usage: node openai_client.mjs BASE_URL API_KEY
// (tests/api/run.sh runs it after `npm install` of package.json in a scratch folder).
//
// The served model has random weights, so the tests check shapes and invariants, not words.  The
// tool call is made deterministic with logit_bias: token 66277 is "[]}", so with tool_choice naming
// the function the model's one token closes the call the server opened:
//   <tool_call>\n{"name": "get_weather", "arguments": []}
import assert from "node:assert/strict";
import OpenAI from "openai";

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120000 });
let failed = 0;

async function check(name, fn) {
	try {
		await fn();
		console.log(`PASS  node/${name}`);
	} catch (err) {
		failed++;
		console.log(`FAIL  node/${name}: ${err.stack || err}`);
	}
}

const tools = [{
	type: "function",
	function: {
		name: "get_weather",
		description: "Current weather of a city",
		parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
	},
}];

let model;
await check("models", async () => {
	const list = await client.models.list();
	assert.equal(list.data.length, 1);
	model = list.data[0].id;
	assert.equal(list.data[0].object, "model");
});

await check("chat", async () => {
	const r = await client.chat.completions.create({
		model, messages: [{ role: "user", content: "Say hello" }], max_tokens: 6, seed: 3,
	});
	assert.equal(r.object, "chat.completion");
	assert.equal(r.choices.length, 1);
	assert.equal(r.choices[0].message.role, "assistant");
	assert.equal(typeof r.choices[0].message.content, "string");
	assert.ok(["stop", "length"].includes(r.choices[0].finish_reason));
	assert.ok(r.usage.prompt_tokens > 0 && r.usage.completion_tokens > 0);
	assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
	assert.equal(typeof r.usage.prompt_tokens_details.cached_tokens, "number");
	// the same seed gives the same answer
	const again = await client.chat.completions.create({
		model, messages: [{ role: "user", content: "Say hello" }], max_tokens: 6, seed: 3,
	});
	assert.equal(again.choices[0].message.content, r.choices[0].message.content);
});

await check("chat-stream", async () => {
	const stream = await client.chat.completions.create({
		model, messages: [{ role: "user", content: "Count to three" }], max_tokens: 6, seed: 5,
		stream: true, stream_options: { include_usage: true },
	});
	let text = "", finish = null, usage = null, chunks = 0;
	for await (const chunk of stream) {
		chunks++;
		if (chunk.usage) usage = chunk.usage;
		for (const c of chunk.choices) {
			text += c.delta.content ?? "";
			if (c.finish_reason) finish = c.finish_reason;
		}
	}
	assert.ok(chunks >= 3, `only ${chunks} chunks`);
	assert.ok(finish === "length" || finish === "stop");
	assert.ok(usage && usage.completion_tokens > 0);
	const whole = await client.chat.completions.create({
		model, messages: [{ role: "user", content: "Count to three" }], max_tokens: 6, seed: 5,
	});
	assert.equal(text, whole.choices[0].message.content, "streamed text differs from the whole answer");
});

await check("completions", async () => {
	const r = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 5, seed: 1 });
	assert.equal(r.object, "text_completion");
	assert.equal(typeof r.choices[0].text, "string");
	assert.equal(r.usage.completion_tokens, 5);
});

await check("tool-call-round-trip", async () => {
	const messages = [{ role: "user", content: "What is the weather in Paris?" }];
	const first = await client.chat.completions.create({
		model, messages, tools, max_tokens: 1, logit_bias: { "66277": 100 },
		tool_choice: { type: "function", function: { name: "get_weather" } },
	});
	const msg = first.choices[0].message;
	assert.equal(msg.tool_calls?.length, 1, JSON.stringify(msg));
	assert.equal(msg.tool_calls[0].type, "function");
	assert.equal(msg.tool_calls[0].function.name, "get_weather");
	assert.equal(msg.tool_calls[0].function.arguments, "[]");
	assert.match(msg.tool_calls[0].id, /^call_/);
	messages.push(msg);
	messages.push({ role: "tool", tool_call_id: msg.tool_calls[0].id, content: '{"temp_c": 21}' });
	const second = await client.chat.completions.create({ model, messages, tools, max_tokens: 4 });
	assert.equal(second.choices[0].message.role, "assistant");
	assert.ok(second.usage.prompt_tokens > first.usage.prompt_tokens);
	// the first turn's prompt was saved: the second reuses it
	assert.ok(second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1,
		  JSON.stringify(second.usage));
});

await check("errors", async () => {
	const cases = [
		[{ model, messages: [{ role: "user", content: "x" }], temperature: "hot" }, 400, "temperature"],
		[{ model, messages: [{ role: "user", content: "x" }], n: 2 }, 400, "n"],
		[{ model, messages: [] }, 400, "messages"],
		[{ model, messages: [{ role: "wizard", content: "x" }] }, 400, "messages[0].role"],
	];
	for (const [body, status, param] of cases) {
		await assert.rejects(client.chat.completions.create(body), (err) => {
			assert.ok(err instanceof OpenAI.APIError, String(err));
			assert.equal(err.status, status);
			assert.equal(err.param, param);
			assert.equal(err.type, "invalid_request_error");
			return true;
		});
	}
	const bad = new OpenAI({ baseURL, apiKey: "wrong-key", maxRetries: 0 });
	await assert.rejects(bad.models.list(), (err) => err.status === 401 && err.type === "authentication_error");
});

process.exit(failed ? 1 : 0);
