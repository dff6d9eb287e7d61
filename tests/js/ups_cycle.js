// A full UPS cycle against the broker with dcmjs-dimse, an implementation independent of pynetdicom:
// an event receiver (an SCP of the UPS Event SOP Class), a global subscription, then - once the test
// has placed an HL7 order and written its accession number to stdin - find, claim, progress, complete,
// N-GET, and the N-EVENT-REPORTs that arrived. One JSON line with everything on stdout at the end.
//
// Usage: node ups_cycle.js BROKER_PORT RECEIVER_PORT   (the receiver's AE title is JSSUB)
'use strict';

const readline = require('readline');
const crypto = require('crypto');
const dcmjsDimse = require('dcmjs-dimse');

const { Client, Dataset, Server, Scp } = dcmjsDimse;
const { CFindRequest, NActionRequest, NGetRequest, NSetRequest } = dcmjsDimse.requests;
const { NEventReportResponse } = dcmjsDimse.responses;
const { Status, PresentationContextResult, TransferSyntax } = dcmjsDimse.constants;

dcmjsDimse.log.setLevel('error'); // stdout carries the protocol with the test: SUBSCRIBED, then the result

const UPS_PUSH = '1.2.840.10008.5.1.4.34.6.1';
const UPS_PULL = '1.2.840.10008.5.1.4.34.6.3';
const UPS_EVENT = '1.2.840.10008.5.1.4.34.6.4';
const GLOBAL_SUBSCRIPTION = '1.2.840.10008.5.1.4.34.5';
const [brokerPort, receiverPort] = process.argv.slice(2).map(Number);
const received = [];

class EventReceiver extends Scp {
  associationRequested(association) {
    this.association = association;
    association.getPresentationContexts().forEach((c) => {
      const context = association.getPresentationContext(c.id);
      if ([UPS_EVENT, UPS_PUSH].includes(context.getAbstractSyntaxUid())) {
        const syntaxes = context.getTransferSyntaxUids();
        const chosen = syntaxes.find((ts) => ts === TransferSyntax.ExplicitVRLittleEndian)
          || syntaxes.find((ts) => ts === TransferSyntax.ImplicitVRLittleEndian);
        if (chosen) {
          context.setResult(PresentationContextResult.Accept, chosen);
        } else {
          context.setResult(PresentationContextResult.RejectTransferSyntaxesNotSupported);
        }
      } else {
        context.setResult(PresentationContextResult.RejectAbstractSyntaxNotSupported);
      }
    });
    this.sendAssociationAccept();
  }

  nEventReportRequest(request, callback) {
    const info = request.getDataset() ? request.getDataset().getElements() : {};
    received.push({
      type: request.getEventTypeId(),
      uid: request.getAffectedSopInstanceUid(),
      state: info.ProcedureStepState || '',
      progress: info.ProcedureStepProgressInformationSequence
        ? Number(first(info.ProcedureStepProgressInformationSequence).ProcedureStepProgress) : null,
    });
    const response = NEventReportResponse.fromRequest(request);
    response.setStatus(Status.Success);
    callback(response);
  }

  associationReleaseRequested() {
    this.sendAssociationReleaseResponse();
  }
}

function first(sequence) {
  return Array.isArray(sequence) ? sequence[0] : sequence;
}

// Send one request on its own association; resolves with the responses (status, dataset elements).
function send(request) {
  return new Promise((resolve, reject) => {
    const responses = [];
    const client = new Client();
    request.on('response', (response) => {
      responses.push({
        status: response.getStatus(),
        comment: response.getErrorComment ? response.getErrorComment() : undefined,
        dataset: response.getDataset() ? response.getDataset().getElements() : null,
      });
    });
    client.addRequest(request);
    client.on('networkError', (e) => reject(e));
    client.on('closed', () => resolve(responses));
    client.send('127.0.0.1', brokerPort, 'JSSCU', 'BROKER', { associationTimeout: 10000, pduTimeout: 10000 });
  });
}

function action(uid, type, elements) {
  const request = new NActionRequest(UPS_PUSH, uid, type);
  request.setDataset(new Dataset(elements));
  return send(request).then((r) => r[0].status);
}

function nSet(uid, elements) {
  const request = new NSetRequest(UPS_PUSH, uid);
  request.setDataset(new Dataset(elements));
  return send(request).then((r) => r[0].status);
}

function waitFor(predicate, ms) {
  return new Promise((resolve) => {
    const started = Date.now();
    const timer = setInterval(() => {
      if (predicate() || Date.now() - started > ms) {
        clearInterval(timer);
        resolve();
      }
    }, 50);
  });
}

function nextLine() {
  const lines = readline.createInterface({ input: process.stdin });
  return new Promise((resolve) => lines.once('line', (line) => { lines.close(); resolve(line.trim()); }));
}

async function main() {
  const server = new Server(EventReceiver);
  server.on('networkError', (e) => process.stderr.write(`receiver: ${e}\n`));
  server.listen(receiverPort);
  const result = {};
  try {
    result.subscribe = await action(GLOBAL_SUBSCRIPTION, 3, { ReceivingAE: 'JSSUB', DeletionLock: 'FALSE' });
    process.stdout.write('SUBSCRIBED\n');
    const accession = await nextLine();

    const find = new CFindRequest();
    find.setAffectedSopClassUid(UPS_PULL);
    find.setDataset(new Dataset({
      SOPInstanceUID: '', ProcedureStepState: 'SCHEDULED', PatientName: '', ProcedureStepLabel: '',
      ReferencedRequestSequence: [{ AccessionNumber: accession }],
    }));
    const found = (await send(find)).filter((r) => r.status === Status.Pending);
    result.found = found.length;
    const uid = found[0].dataset.SOPInstanceUID;
    result.uid = uid;

    const transactionUid = `2.25.${BigInt(`0x${crypto.randomBytes(16).toString('hex')}`)}`;
    result.claim = await action(uid, 1, { ProcedureStepState: 'IN PROGRESS', TransactionUID: transactionUid });
    result.claimAgain = await action(uid, 1, { ProcedureStepState: 'IN PROGRESS', TransactionUID: '2.25.1' });
    result.progress = await nSet(uid, {
      TransactionUID: transactionUid,
      ProcedureStepProgressInformationSequence: [{ ProcedureStepProgress: '60' }],
    });
    result.final = await nSet(uid, {
      TransactionUID: transactionUid,
      UnifiedProcedureStepPerformedProcedureSequence: [{
        PerformedProcedureStepStartDateTime: '20261201100000', PerformedProcedureStepEndDateTime: '20261201101000',
      }],
    });
    result.completeWrongUid = await action(uid, 1, { ProcedureStepState: 'COMPLETED', TransactionUID: '2.25.2' });
    result.complete = await action(uid, 1, { ProcedureStepState: 'COMPLETED', TransactionUID: transactionUid });
    const get = new NGetRequest(UPS_PUSH, uid, []);
    const [got] = await send(get);
    result.get = got.status;
    result.state = got.dataset ? got.dataset.ProcedureStepState : null;
    // Wait for the last report (COMPLETED): four are expected, and they may arrive after the N-GET.
    await waitFor(() => received.some((e) => e.uid === uid && e.state === 'COMPLETED'), 20000);
    result.events = received;
  } catch (e) {
    result.error = String(e && e.stack ? e.stack : e);
  } finally {
    server.close();
  }
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main();
