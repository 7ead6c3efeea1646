#!/usr/bin/env node
// Minimal sinkstream client in Node.js: the stubs are built at run time from the same .proto files the
// server uses (protos/sinkstream/v1/*.proto), with @grpc/proto-loader and @grpc/grpc-js.
//
//   node client.js --server 127.0.0.1:50051 --file doc.txt --prompt "Once upon a time" --max-new-tokens 32
//
// A secured server: --tls-ca PEM (or $SINKSTREAM_TLS_CA) connects with TLS, trusting that CA; --tls-cert and
// --tls-key add a client certificate (mutual TLS); --token (or $SINKSTREAM_TOKEN) is sent as the
// `authorization: Bearer TOKEN` metadata.
//
// Opens a session (--session-id: with that id, also sent as `x-session-id` metadata for a proxy to route
// on), streams the file in pieces of about --piece-bytes bytes (default 64 KiB, in bounded memory), then
// appends the prompt and generates. Prints one JSON object per line: {"type":"opened"},
// one {"type":"chunk"} per processed chunk, {"type":"flushed"}, {"type":"token"} per generated token,
// {"type":"generation"}, {"type":"closed"}.
'use strict';

const fs = require('fs');
const path = require('path');
const { StringDecoder } = require('string_decoder');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const PIECE_BYTES = 64 * 1024; // default file bytes read per AppendText message

function parseArgs(argv) {
  const args = {
    server: '127.0.0.1:50051', file: null, prompt: null, maxNewTokens: 32, deadline: 600, pieceBytes: PIECE_BYTES,
    tlsCa: process.env.SINKSTREAM_TLS_CA || null, tlsCert: null, tlsKey: null,
    token: process.env.SINKSTREAM_TOKEN || null,
    sessionId: '',
  };
  for (let i = 0; i < argv.length; i += 1) {
    const value = argv[i + 1];
    switch (argv[i]) {
      case '--server': args.server = value; i += 1; break;
      case '--file': args.file = value; i += 1; break;
      case '--prompt': args.prompt = value; i += 1; break;
      case '--max-new-tokens': args.maxNewTokens = Number(value); i += 1; break;
      case '--deadline': args.deadline = Number(value); i += 1; break;
      case '--piece-bytes': args.pieceBytes = Number(value); i += 1; break;
      case '--tls-ca': args.tlsCa = value; i += 1; break;
      case '--tls-cert': args.tlsCert = value; i += 1; break;
      case '--tls-key': args.tlsKey = value; i += 1; break;
      case '--token': args.token = value; i += 1; break;
      case '--session-id': args.sessionId = value; i += 1; break;
      case '-h': case '--help':
        console.log('usage: node client.js [--server HOST:PORT] [--file PATH] [--prompt TEXT] '
          + '[--max-new-tokens N] [--deadline SECONDS] [--piece-bytes N] '
          + '[--tls-ca PEM [--tls-cert PEM --tls-key PEM]] [--token TOKEN] [--session-id ID]');
        process.exit(0);
        break;
      default:
        console.error(`unknown argument ${argv[i]}`);
        process.exit(2);
    }
  }
  if (!Number.isInteger(args.pieceBytes) || args.pieceBytes < 1) {
    console.error('--piece-bytes must be a positive integer');
    process.exit(2);
  }
  if (Boolean(args.tlsCert) !== Boolean(args.tlsKey)) {
    console.error('--tls-cert and --tls-key go together');
    process.exit(2);
  }
  if (!args.file && args.prompt === null) {
    console.error('give --file and/or --prompt');
    process.exit(2);
  }
  return args;
}

// Plaintext, or TLS trusting --tls-ca (with a client certificate for mutual TLS).
function channelCredentials(args) {
  if (!args.tlsCa && !args.tlsCert) return grpc.credentials.createInsecure();
  const read = (file) => (file ? fs.readFileSync(file) : null);
  return grpc.credentials.createSsl(read(args.tlsCa), read(args.tlsKey), read(args.tlsCert));
}

function callMetadata(args) {
  const metadata = new grpc.Metadata();
  if (args.token) metadata.add('authorization', `Bearer ${args.token}`);
  return metadata;
}

function loadService() {
  const definition = protoLoader.loadSync('sinkstream/v1/sinkstream.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the .proto (tokens_seen, session_opened, ...)
    longs: Number, // uint64 counters as JS numbers (exact below 2^53)
    enums: String, // e.g. stop_reason: "STOP_REASON_MAX_TOKENS"
    defaults: true,
    oneofs: true, // sets `kind` to the name of the oneof field present
  });
  return grpc.loadPackageDefinition(definition).sinkstream.v1.SinkStream;
}

// Writes one request and, when grpc-js's send buffer is full, waits for it to drain. Resolves to false
// once the call is over (ended, failed or cancelled), when nothing more should be written.
function send(call, request) {
  if (call.writableEnded || call.destroyed) return Promise.resolve(false);
  if (call.write(request)) return Promise.resolve(true);
  return new Promise((resolve) => {
    const events = ['drain', 'end', 'error', 'close'];
    const done = (event) => {
      events.forEach((e) => call.off(e, handlers[e]));
      resolve(event === 'drain');
    };
    const handlers = Object.fromEntries(events.map((e) => [e, () => done(e)]));
    events.forEach((e) => call.once(e, handlers[e]));
  });
}

// Streams a file as AppendText requests in bounded memory: reads `pieceBytes` bytes at a time and
// respects the call's backpressure. Pieces end on code-point boundaries: the decoder holds back a UTF-8
// sequence cut by a block until the next block completes it, so every request carries valid text (a
// piece may be a few bytes shorter or longer than pieceBytes). The last request (possibly empty) flushes.
async function sendFile(call, file, pieceBytes) {
  const decoder = new StringDecoder('utf8');
  const stream = fs.createReadStream(file, { highWaterMark: pieceBytes });
  try {
    for await (const block of stream) {
      const text = decoder.write(block);
      if (text && !(await send(call, { request_id: 'append', append_text: { text, flush: false } }))) return;
    }
  } finally {
    stream.destroy();
  }
  await send(call, { request_id: 'append', append_text: { text: decoder.end(), flush: true } });
}

function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

function meanLogprob(logprobs) {
  const scored = logprobs.filter((x) => !Number.isNaN(x));
  return scored.length ? scored.reduce((a, b) => a + b, 0) / scored.length : null;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.file) {
    try {
      fs.accessSync(args.file, fs.constants.R_OK);
    } catch (err) {
      console.error(`sinkstream: cannot read ${args.file}: ${err.message}`);
      process.exit(2);
    }
  }
  const SinkStream = loadService();
  let credentials;
  try {
    credentials = channelCredentials(args);
  } catch (err) {
    console.error(`sinkstream: TLS files: ${err.message}`);
    process.exit(2);
  }
  const client = new SinkStream(args.server, credentials, {
    'grpc.max_receive_message_length': 64 << 20,
    'grpc.max_send_message_length': 64 << 20,
  });
  // A consistent-hash proxy in front of several replicas routes on x-session-id (the server ignores it).
  const metadata = callMetadata(args);
  if (args.sessionId) metadata.set('x-session-id', args.sessionId);
  const call = client.Stream(metadata, { deadline: Date.now() + args.deadline * 1000 });

  // Requests are written in order; the server answers them in order.
  const steps = [];
  if (args.file) {
    steps.push(() => sendFile(call, args.file, args.pieceBytes).catch((err) => {
      console.error(`sinkstream: reading ${args.file}: ${err.message}`);
      process.exitCode = 1;
      call.cancel();
    }));
  }
  if (args.prompt !== null) {
    steps.push(() => {
      call.write({ request_id: 'prompt', append_text: { text: args.prompt, flush: false } });
      call.write({ request_id: 'generate', generate: { max_new_tokens: args.maxNewTokens } });
    });
  }
  steps.push(() => call.write({ request_id: 'close', close: {} }));
  const next = () => steps.shift()();

  let failed = false;
  call.on('data', (response) => {
    switch (response.kind) {
      case 'session_opened': {
        const o = response.session_opened;
        // proto3 `optional` fields show up with synthetic "_name" oneof markers; leave those out.
        const settings = Object.fromEntries(Object.entries(o.settings).filter(([k]) => !k.startsWith('_')));
        emit({ type: 'opened', session_id: o.session_id, resumed: o.resumed, settings });
        next();
        break;
      }
      case 'chunk': {
        const c = response.chunk;
        emit({
          type: 'chunk', num_tokens: c.num_tokens, tokens_seen: c.tokens_seen, mean_logprob: meanLogprob(c.logprobs),
          perplexity: c.perplexity, cache_used: c.cache ? c.cache.used : null,
        });
        break;
      }
      case 'flushed':
        emit({ type: 'flushed', ...response.flushed });
        next();
        break;
      case 'token':
        emit({ type: 'token', index: response.token.index, token_id: response.token.token_id, text: response.token.text });
        break;
      case 'generation_complete': {
        const g = response.generation_complete;
        emit({
          type: 'generation', text: g.text, generated_tokens: g.generated_tokens, stop_reason: g.stop_reason,
          tokens_seen: g.tokens_seen, time_to_first_token_s: g.time_to_first_token_s,
        });
        next();
        break;
      }
      case 'closed':
        emit({ type: 'closed', ...response.closed });
        call.end();
        break;
      case 'error':
        failed = true;
        emit({ type: 'error', ...response.error });
        call.end();
        break;
      default:
        break;
    }
  });
  call.on('error', (err) => {
    console.error(`sinkstream: ${err.code} ${err.details || err.message}`);
    process.exitCode = 1;
  });
  call.on('end', () => {
    if (failed) process.exitCode = 1;
    client.close();
  });

  call.write({
    request_id: 'open',
    open: { session_id: args.sessionId, settings: { analysis: { logprobs: true } } },
  });
}

main();
