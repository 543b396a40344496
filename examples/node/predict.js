// One payment through the platform from Node, with the .proto files in protos/ alone (loaded at run
// time, no generated code): append it, ask for a decision, record the outcome.
//
//   npm ci --prefix examples/node
//   export D2D_API_KEY=$(cat .d2d/admin.key)   # a key whose role may append, predict and record
//   node examples/node/predict.js --model fraud
//
// The key needs the `producer` role (AppendEvents) and the `app` role (Predict, RecordOutcome): an
// admin key has both. Addresses come from the flags, else D2D_INGEST_ADDR, D2D_SERVING_ADDR and
// D2D_FEEDBACK_ADDR, else the defaults `d2d up` listens on.
'use strict';

const path = require('node:path');
const crypto = require('node:crypto');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const googleProtos = require('google-proto-files');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');

const { values: args } = parseArgs({
  options: {
    ingest: { type: 'string', default: process.env.D2D_INGEST_ADDR || '127.0.0.1:50051' },
    serving: { type: 'string', default: process.env.D2D_SERVING_ADDR || '127.0.0.1:50054' },
    feedback: { type: 'string', default: process.env.D2D_FEEDBACK_ADDR || '127.0.0.1:50055' },
    model: { type: 'string', default: 'fraud' },
    customer: { type: 'string', default: 'cus_000001' },
    merchant: { type: 'string', default: 'mer_0001' },
    card: { type: 'string', default: 'card_000001_1' },
    amount: { type: 'string', default: '120' },
    label: { type: 'string', default: '0' },
  },
});

// The platform's API, read from protos/ (google/api annotations from google-proto-files).
const definition = protoLoader.loadSync(
  ['d2d/v1/ingest.proto', 'd2d/v1/serving.proto', 'd2d/v1/feedback.proto'],
  {
    keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
    includeDirs: [PROTOS, path.dirname(googleProtos.getProtoPath())],
  },
);
const v1 = grpc.loadPackageDefinition(definition).d2d.v1;

// Every call carries the API key as `authorization: Bearer <key>` metadata.
const apiKey = process.env.D2D_API_KEY;
if (!apiKey) throw new Error('set D2D_API_KEY to an API key (d2d keys create, or .d2d/admin.key)');
const metadata = new grpc.Metadata();
metadata.set('authorization', `Bearer ${apiKey}`);

const credentials = grpc.credentials.createInsecure();
const ingest = new v1.IngestService(args.ingest, credentials);
const serving = new v1.ServingService(args.serving, credentials);
const feedback = new v1.FeedbackService(args.feedback, credentials);

function call(client, method, request) {
  const deadline = new Date(Date.now() + 10_000);
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// google.protobuf.Struct from a plain object of strings, numbers and booleans.
function struct(object) {
  const fields = {};
  for (const [key, value] of Object.entries(object)) {
    if (typeof value === 'number') fields[key] = { numberValue: value };
    else if (typeof value === 'boolean') fields[key] = { boolValue: value };
    else fields[key] = { stringValue: String(value) };
  }
  return { fields };
}

function timestamp(date) {
  return { seconds: String(Math.floor(date.getTime() / 1000)), nanos: (date.getTime() % 1000) * 1e6 };
}

async function main() {
  const now = new Date();
  const paymentId = `pay_${crypto.randomInt(10 ** 11, 10 ** 12 - 1)}`;
  const payment = {
    payment_id: paymentId, customer_id: args.customer, merchant_id: args.merchant, card_id: args.card,
    amount: Number(args.amount), currency: 'EUR', channel: 'ecom', ip_country: 'DE',
    device_id: `dev_${crypto.randomBytes(6).toString('hex')}`,
  };

  // 1. The payment is a fact: append it to the log (validated against its contract).
  const appended = await call(ingest, 'AppendEvents', {
    events: [{
      event_id: crypto.randomUUID(), type: 'payment.authorized', entity_type: 'payment', entity_id: paymentId,
      occurred_at: timestamp(now), payload: Buffer.from(JSON.stringify(payment)),
    }],
  });
  const [result] = appended.results;
  if (result.outcome !== 'seq') throw new Error(`refused: ${result.error.message}`);
  console.log(`appended payment ${paymentId} at log seq ${result.seq}`);

  // 2. A decision on it, on features that already count this payment (min_feature_watermark).
  const decision = await call(serving, 'Predict', {
    model: `models/${args.model}`,
    entities: { customer: args.customer, merchant: args.merchant, card: args.card },
    context: struct({ ...payment, occurred_at: now.toISOString() }),
    unit_id: args.customer, request_id: paymentId, min_feature_watermark: result.seq,
  });
  console.log(
    `decision ${decision.decision_id}: ${decision.action} (score ${decision.score.toFixed(4)}, `
    + `${decision.model_version}, ${decision.arm}, features as of seq ${decision.feature_watermark})`,
  );

  // 3. Later, what happened: the decision's outcome, which live metrics and retraining learn from.
  const outcome = await call(feedback, 'RecordOutcome', {
    outcome: { decision: decision.decision_id, label: Number(args.label), occur_time: timestamp(new Date()) },
  });
  console.log(`outcome ${outcome.name}: label ${outcome.label} at log seq ${outcome.seq}`);
}

main()
  .catch((error) => {
    console.error(error.details ? `${grpc.status[error.code]}: ${error.details}` : error.message);
    process.exitCode = 1;
  })
  .finally(() => [ingest, serving, feedback].forEach((client) => client.close()));
