/**
 * uPlot charts: bar charts of daily usage and the admin page's sparklines. The canvas is hidden from assistive
 * technology; every chart sits next to a table or a sentence with the same numbers.
 *
 * @module
 */
import { useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";

export interface Series {
  label: string;
  values: number[];
  color: string;
}

/** Epoch seconds of a YYYY-MM-DD day (UTC), uPlot's time axis unit. */
const daySeconds = (day: string) => Date.parse(`${day}T00:00:00Z`) / 1000;

function useUplot(build: (el: HTMLElement, width: number) => uPlot, deps: unknown[]) {
  const ref = useRef<HTMLDivElement>(null);
  useEffect(() => {
    const el = ref.current!;
    let plot = build(el, el.clientWidth || 600);
    const resize = new ResizeObserver(() => {
      if (el.clientWidth && el.clientWidth !== plot.width) plot.setSize({ width: el.clientWidth, height: plot.height });
    });
    resize.observe(el);
    return () => {
      resize.disconnect();
      plot.destroy();
      plot = undefined as unknown as uPlot;
    };
  }, deps);
  return ref;
}

/** Side-by-side bars per day, one colour per series. */
export function BarChart({ title, days, series }: { title: string; days: string[]; series: Series[] }) {
  const ref = useUplot(
    (el, width) => {
      const bars = (i: number) => uPlot.paths.bars!({ size: [0.8 / series.length, 40], align: i === 0 ? -1 : 1 });
      return new uPlot(
        {
          width,
          height: 220,
          // Half a day of room on each side, so the first and last days' bars are not cut off.
          // Half a day of room on each side, so the first and last days' bars are not cut off.
          scales: {
            x: { time: true, range: (_u, min, max) => [min - 43_200, max + 43_200] },
            y: { range: (_u, _min, max) => [0, Math.max(1, max) * 1.1] },
          },
          legend: { live: false },
          axes: [{}, { size: 60 }],
          series: [
            {},
            ...series.map((s, i) => ({
              label: s.label,
              stroke: s.color,
              fill: `${s.color}cc`,
              paths: bars(i),
              points: { show: false },
            })),
          ],
        },
        [days.map(daySeconds), ...series.map((s) => s.values)],
        el,
      );
    },
    [days.join(), JSON.stringify(series)],
  );
  return (
    <figure class="chart">
      <figcaption>{title}</figcaption>
      <div ref={ref} aria-hidden="true" />
    </figure>
  );
}

/** A tiny line of daily values without axes or legend. */
export function Sparkline({ days, values, label }: { days: string[]; values: number[]; label: string }) {
  const ref = useUplot(
    (el) =>
      new uPlot(
        {
          width: 120,
          height: 28,
          pxAlign: false,
          cursor: { show: false },
          legend: { show: false },
          select: { show: false, left: 0, top: 0, width: 0, height: 0 },
          scales: { x: { time: false }, y: { range: (_u, _min, max) => [0, Math.max(1, max)] } },
          axes: [{ show: false }, { show: false }],
          series: [{}, { stroke: "#1d4ed8", fill: "#1d4ed833", width: 1.5, points: { show: false } }],
        },
        [days.map(daySeconds), values],
        el,
      ),
    [days.join(), values.join()],
  );
  return (
    <div class="sparkline" role="img" aria-label={label}>
      <div ref={ref} aria-hidden="true" />
    </div>
  );
}
